################################################################################
# Nodes and placement
################################################################################

variable "name_prefix" {
  description = "Prefix of every host name: hosts are named <name_prefix>-<role>-<index> (for example plc-node-1, plc-balancer-1). Lower-case letters, digits and hyphens, starting with a letter, not ending with a hyphen, at most 32 characters, so every name is a valid host name."
  type        = string
  default     = "plc"

  validation {
    condition     = can(regex("^[a-z]([a-z0-9-]{0,30}[a-z0-9])?$", var.name_prefix))
    error_message = "name_prefix must match ^[a-z]([a-z0-9-]{0,30}[a-z0-9])?$ (lower-case letter first, then letters, digits or hyphens, not ending with a hyphen, 1-32 characters)."
  }
}

variable "node_count" {
  description = "Number of mirror nodes. Every node runs an etcd member, PostgreSQL under Patroni and the plc mirror, so the count is the etcd cluster size: odd (an even member adds no fault tolerance) and at least 3 (to survive the loss of one node)."
  type        = number
  default     = 3

  validation {
    condition     = floor(var.node_count) == var.node_count
    error_message = "node_count must be a whole number."
  }

  validation {
    condition     = var.node_count >= 3
    error_message = "node_count must be at least 3: etcd needs 3 members to keep quorum when one node is lost."
  }

  validation {
    # Judged for whole numbers only; the first rule reports fractions.
    condition     = floor(var.node_count) != var.node_count || var.node_count % 2 == 1
    error_message = "node_count must be odd: an even etcd cluster tolerates no more failures than the odd one below it."
  }

  validation {
    condition     = var.node_count <= 9
    error_message = "node_count must be at most 9: more etcd members slow every write, and a Hetzner spread placement group holds at most 10 servers."
  }
}

variable "balancer_count" {
  description = "Number of separate balancer hosts (the Ansible 'balancers' group, e.g. HAProxy in front of the mirrors). 0 when a cloud load balancer does that job, as in terraform/hcloud."
  type        = number
  default     = 0

  validation {
    condition     = floor(var.balancer_count) == var.balancer_count && var.balancer_count >= 0 && var.balancer_count <= 9
    error_message = "balancer_count must be a whole number from 0 to 9."
  }
}

variable "locations" {
  description = "Hetzner Cloud locations the hosts are spread over, round-robin in list order (node 1 in the first, node 2 in the second, ...). Known: fsn1, nbg1, hel1 (network zone eu-central), ash (us-east), hil (us-west), sin (ap-southeast). All must be in one network zone, because a private network subnet lives in exactly one zone."
  type        = list(string)
  default     = ["fsn1", "nbg1", "hel1"]

  validation {
    condition     = length(var.locations) > 0
    error_message = "locations must not be empty."
  }

  validation {
    condition     = alltrue([for l in var.locations : contains(keys(local.network_zones), l)])
    error_message = "Every location must be one of the known Hetzner Cloud locations: fsn1, nbg1, hel1, ash, hil, sin."
  }

  validation {
    condition     = length(distinct(var.locations)) == length(var.locations)
    error_message = "locations must not repeat a location (the round-robin spread would put more nodes in it than intended)."
  }

  validation {
    # Unknown locations are reported by the rule above; here they count as no zone.
    condition     = length(distinct([for l in var.locations : lookup(local.network_zones, l, "")])) <= 1
    error_message = "All locations must be in the same network zone (eu-central: fsn1, nbg1, hel1; us-east: ash; us-west: hil; ap-southeast: sin): one private subnet cannot span zones."
  }
}

################################################################################
# Private network
################################################################################

variable "network_cidr" {
  description = "IPv4 range of the whole private network (RFC 1918, written with its host bits zero, e.g. 10.42.0.0/16)."
  type        = string
  default     = "10.42.0.0/16"

  validation {
    condition     = can(regex("^\\d+\\.\\d+\\.\\d+\\.\\d+/\\d+$", var.network_cidr)) && can(cidrhost(var.network_cidr, 0))
    error_message = "network_cidr must be an IPv4 CIDR such as 10.42.0.0/16."
  }

  validation {
    condition     = try(cidrhost(var.network_cidr, 0) == split("/", var.network_cidr)[0], true)
    error_message = "network_cidr must be written with its host bits zero (e.g. 10.42.0.0/16, not 10.42.1.0/16)."
  }

  validation {
    # Address as a number: sum of octet * 256^(3 - position); ranges as {prefix, number}.
    condition = try(anytrue([
      for r in [{ p = 8, n = 167772160 }, { p = 12, n = 2886729728 }, { p = 16, n = 3232235520 }] :
      tonumber(split("/", var.network_cidr)[1]) >= r.p &&
      floor(sum([for i, o in split(".", split("/", var.network_cidr)[0]) : tonumber(o) * pow(256, 3 - i)]) / pow(2, 32 - r.p)) == floor(r.n / pow(2, 32 - r.p))
    ]), true)
    error_message = "network_cidr must lie inside 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16 (private networks only)."
  }
}

variable "subnet_cidr" {
  description = "IPv4 subnet inside network_cidr that the hosts and the cloud load balancer get their private addresses from (written with its host bits zero, e.g. 10.42.1.0/24)."
  type        = string
  default     = "10.42.1.0/24"

  validation {
    condition     = can(regex("^\\d+\\.\\d+\\.\\d+\\.\\d+/\\d+$", var.subnet_cidr)) && can(cidrhost(var.subnet_cidr, 0))
    error_message = "subnet_cidr must be an IPv4 CIDR such as 10.42.1.0/24."
  }

  validation {
    condition     = try(cidrhost(var.subnet_cidr, 0) == split("/", var.subnet_cidr)[0], true)
    error_message = "subnet_cidr must be written with its host bits zero (e.g. 10.42.1.0/24, not 10.42.1.5/24)."
  }

  validation {
    # Only judged when both CIDRs parse; the rules above report unparsable ones.
    condition = try(
      tonumber(split("/", var.subnet_cidr)[1]) >= tonumber(split("/", var.network_cidr)[1]) &&
      floor(sum([for i, o in split(".", split("/", var.subnet_cidr)[0]) : tonumber(o) * pow(256, 3 - i)]) / pow(2, 32 - tonumber(split("/", var.network_cidr)[1]))) ==
      floor(sum([for i, o in split(".", split("/", var.network_cidr)[0]) : tonumber(o) * pow(256, 3 - i)]) / pow(2, 32 - tonumber(split("/", var.network_cidr)[1]))),
      true
    )
    error_message = "subnet_cidr must lie inside network_cidr."
  }
}

variable "ip_offsets" {
  description = "Where addresses are taken from in subnet_cidr: the cloud load balancer gets host number load_balancer, node i (from 1) gets node + i, balancer i gets balancer + i (cidrhost numbering). Host number 1 is the Hetzner network gateway, so everything starts at 2 or later."
  type = object({
    load_balancer = optional(number, 5)
    node          = optional(number, 10)
    balancer      = optional(number, 100)
  })
  default = {}

  validation {
    condition = (
      var.ip_offsets.load_balancer >= 2 &&
      var.ip_offsets.node >= var.ip_offsets.load_balancer &&
      var.ip_offsets.balancer >= var.ip_offsets.node + var.node_count
    )
    error_message = "ip_offsets must keep the ranges apart and in order: 2 <= load_balancer <= node, and balancer >= node + node_count (so no two hosts share an address and the gateway .1 is never used)."
  }

  validation {
    # The highest host number used must stay below the subnet's broadcast address.
    condition     = try(var.ip_offsets.balancer + var.balancer_count <= pow(2, 32 - tonumber(split("/", var.subnet_cidr)[1])) - 2, true)
    error_message = "subnet_cidr is too small for ip_offsets, node_count and balancer_count: the last balancer's address would fall outside it."
  }
}

################################################################################
# Who may connect
################################################################################

variable "admin_cidrs" {
  description = "CIDRs (IPv4 or IPv6) allowed to reach SSH (port 22) on every host. No default: say where you administer from. The whole internet (0.0.0.0/0, ::/0) is refused."
  type        = list(string)

  validation {
    condition     = length(var.admin_cidrs) > 0
    error_message = "admin_cidrs must name at least one network (otherwise nothing, not even Ansible, can reach the hosts)."
  }

  validation {
    condition     = alltrue([for c in var.admin_cidrs : can(cidrhost(c, 0))])
    error_message = "Every admin_cidrs entry must be a CIDR such as 203.0.113.7/32 or 2001:db8::/64."
  }

  validation {
    condition     = !anytrue([for c in var.admin_cidrs : contains(["0.0.0.0/0", "::/0"], c)])
    error_message = "admin_cidrs must not contain 0.0.0.0/0 or ::/0: SSH must not be open to the whole internet."
  }
}

variable "public_cidrs" {
  description = "CIDRs allowed to reach HTTP (80) and HTTPS (443) on the load balancer (the cloud load balancer, or the balancer hosts). Nodes never get 80/443."
  type        = list(string)
  default     = ["0.0.0.0/0", "::/0"]

  validation {
    condition     = length(var.public_cidrs) > 0 && alltrue([for c in var.public_cidrs : can(cidrhost(c, 0))])
    error_message = "public_cidrs must be a non-empty list of CIDRs such as 0.0.0.0/0."
  }
}

################################################################################
# The mirror and the load balancer health check (defaults: ha/health.json)
################################################################################

variable "health_file" {
  description = "Path of ha/health.json, the one definition of health checks; the load balancer check is its checks.mirror_ready (port, path, expect_status) with the cloud LB's own timings from checks.mirror_ready.cloud_lb (interval_s, timeout_s, retries). Null (the default): the repository's ha/health.json, found relative to this module (path.module/../../../ha/health.json). Set it when the module is vendored outside the repository; a relative path is taken from the directory Terraform runs in."
  type        = string
  default     = null

  validation {
    # Only judged for an explicit path; the default file is read as is (a broken one fails in locals).
    condition = var.health_file == null ? true : can([
      for k in ["port", "path", "expect_status"] : jsondecode(file(var.health_file)).checks.mirror_ready[k]
      ]) && can([
      for k in ["interval_s", "timeout_s", "retries"] : jsondecode(file(var.health_file)).checks.mirror_ready.cloud_lb[k]
    ])
    error_message = "health_file must name a readable JSON file with checks.mirror_ready.port, .path, .expect_status and .cloud_lb.interval_s, .timeout_s, .retries (the shape of ha/health.json)."
  }
}

variable "mirror_port" {
  description = "TCP port `plc serve` listens on (PLC_PORT). The load balancer forwards to it and health-checks it; it is open only inside the private network. Null (the default): checks.mirror_ready.port of health_file (2582)."
  type        = number
  default     = null

  validation {
    condition     = var.mirror_port == null ? true : floor(var.mirror_port) == var.mirror_port && var.mirror_port >= 1 && var.mirror_port <= 65535
    error_message = "mirror_port must be a whole number from 1 to 65535."
  }

  validation {
    condition     = var.mirror_port == null ? true : !contains([22, 80, 443, 2379, 2380, 5432, 8008], var.mirror_port)
    error_message = "mirror_port must not be one of the ports already used on the hosts: 22, 80, 443, 2379, 2380, 5432, 8008."
  }
}

variable "health_check_path" {
  description = "Path the load balancer probes with HTTP GET on mirror_port. Null (the default): checks.mirror_ready.path of health_file, /-/ready, the mirror's readiness endpoint (200 only when its database answers `select 1` within 2 s and, on an ingesting node, the lag behind the upstream is within --ready-max-lag; otherwise 503), so a node that is up but lagging or without a database is taken out of rotation."
  type        = string
  default     = null

  validation {
    condition     = var.health_check_path == null ? true : can(regex("^/[^\\s]*$", var.health_check_path))
    error_message = "health_check_path must start with / and contain no whitespace."
  }
}

variable "health_check_interval" {
  description = "Seconds between two health checks of one target. Null (the default): checks.mirror_ready.cloud_lb.interval_s of health_file (10; its cloud_lb_note says why)."
  type        = number
  default     = null

  validation {
    condition     = var.health_check_interval == null ? true : floor(var.health_check_interval) == var.health_check_interval && var.health_check_interval >= 1 && var.health_check_interval <= 300
    error_message = "health_check_interval must be a whole number of seconds from 1 to 300."
  }
}

variable "health_check_timeout" {
  description = "Seconds the load balancer waits for an answer to one check. At least 3 (/-/ready may wait up to 2 s on the database before it answers 503), and the effective timeout must be shorter than the effective interval (checked on the health_check output). Null (the default): checks.mirror_ready.cloud_lb.timeout_s of health_file (5)."
  type        = number
  default     = null

  validation {
    condition     = var.health_check_timeout == null ? true : floor(var.health_check_timeout) == var.health_check_timeout && var.health_check_timeout >= 3
    error_message = "health_check_timeout must be a whole number of seconds, at least 3 (/-/ready may take up to 2 s to answer)."
  }
}

variable "health_check_retries" {
  description = "Failed checks in a row before the load balancer marks a target unhealthy. Null (the default): checks.mirror_ready.cloud_lb.retries of health_file (3)."
  type        = number
  default     = null

  validation {
    condition     = var.health_check_retries == null ? true : floor(var.health_check_retries) == var.health_check_retries && var.health_check_retries >= 1 && var.health_check_retries <= 10
    error_message = "health_check_retries must be a whole number from 1 to 10."
  }
}

################################################################################
# Ansible inventory
################################################################################

variable "public_ips" {
  description = "Address Ansible connects to, per host name (becomes ansible_host). Known only after the hosts exist, so a root module passes its servers' addresses here; hosts left out get no ansible_host (Ansible then uses the host name)."
  type        = map(string)
  default     = {}

  validation {
    condition     = alltrue([for n in keys(var.public_ips) : contains(local.host_names, n)])
    error_message = "Every key of public_ips must be a host name this layout defines (<name_prefix>-node-<i> or <name_prefix>-balancer-<i>)."
  }

  validation {
    # Values may still be unknown during a plan; Terraform then defers this rule.
    condition     = alltrue([for ip in values(var.public_ips) : can(cidrhost("${ip}/${length(split(":", ip)) > 1 ? 128 : 32}", 0))])
    error_message = "Every value of public_ips must be an IPv4 or IPv6 address."
  }
}

variable "ansible_python_interpreter" {
  description = "Python the hosts run Ansible modules with (inventory variable ansible_python_interpreter). Set explicitly: interpreter discovery picks the wrong one on some images."
  type        = string
  default     = "/usr/bin/python3"

  validation {
    condition     = startswith(var.ansible_python_interpreter, "/")
    error_message = "ansible_python_interpreter must be an absolute path."
  }
}
