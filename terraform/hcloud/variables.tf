################################################################################
# Provider
################################################################################

variable "hcloud_token" {
  description = "Hetzner Cloud API token. Null (the default) lets the provider read HCLOUD_TOKEN from the environment, which keeps the token out of tfvars files."
  type        = string
  default     = null
  sensitive   = true
}

variable "labels" {
  description = "Extra labels put on every resource that takes labels (app=plc-mirror, name-prefix and role are always added)."
  type        = map(string)
  default     = {}
}

################################################################################
# Nodes (passed to modules/layout, which validates them)
################################################################################

variable "name_prefix" {
  description = "Prefix of every resource name; servers are <name_prefix>-node-<i>. Validated by modules/layout (lower-case host-name characters, at most 32)."
  type        = string
  default     = "plc"
}

variable "node_count" {
  description = "Number of nodes, each running etcd, PostgreSQL/Patroni and the plc mirror. Odd, 3 to 9 (validated by modules/layout)."
  type        = number
  default     = 3
}

variable "locations" {
  description = "Hetzner locations, nodes spread round-robin; all in one network zone (validated by modules/layout). The load balancer and floating IP go to the first."
  type        = list(string)
  default     = ["fsn1", "nbg1", "hel1"]
}

variable "server_type" {
  description = "Hetzner server type of the nodes (for example cx32, ccx23). PostgreSQL holds the whole directory, so size the disk for it."
  type        = string
  default     = "cx32"

  validation {
    condition     = can(regex("^[a-z0-9-]+$", var.server_type))
    error_message = "server_type must be a Hetzner server type name such as cx32."
  }
}

variable "image" {
  description = "Image the nodes are created from. The Ansible side targets Debian 12."
  type        = string
  default     = "debian-12"

  validation {
    condition     = length(var.image) > 0
    error_message = "image must not be empty."
  }
}

variable "ssh_public_keys" {
  description = "SSH public keys to create and install on every node, by short name (the key is named <name_prefix>-<name> in Hetzner)."
  type        = map(string)
  default     = {}

  validation {
    condition     = alltrue([for k in values(var.ssh_public_keys) : can(regex("^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/=]+", k))])
    error_message = "Every ssh_public_keys value must be an OpenSSH public key line (ssh-ed25519 ..., ssh-rsa ... or ecdsa-sha2-nistp... ...)."
  }
}

variable "ssh_key_ids" {
  description = "IDs or names of SSH keys that already exist in the Hetzner project, installed on every node in addition to ssh_public_keys."
  type        = list(string)
  default     = []
}

################################################################################
# Network and access (validated by modules/layout)
################################################################################

variable "network_cidr" {
  description = "IPv4 range of the private network (RFC 1918)."
  type        = string
  default     = "10.42.0.0/16"
}

variable "subnet_cidr" {
  description = "Subnet of network_cidr the nodes (host numbers 11, 12, ...) and the load balancer (host number 5) are addressed from."
  type        = string
  default     = "10.42.1.0/24"
}

variable "admin_cidrs" {
  description = "CIDRs allowed to SSH (22) to the nodes. Required; 0.0.0.0/0 and ::/0 are refused."
  type        = list(string)
}

variable "public_cidrs" {
  description = "CIDRs the load balancer's 80/443 are meant for. Hetzner load balancers have no firewall, so this is recorded in the layout's rule list but not enforced here."
  type        = list(string)
  default     = ["0.0.0.0/0", "::/0"]
}

################################################################################
# Load balancer and health check
################################################################################

variable "load_balancer_type" {
  description = "Hetzner load balancer type (lb11, lb21, lb31)."
  type        = string
  default     = "lb11"

  validation {
    condition     = contains(["lb11", "lb21", "lb31"], var.load_balancer_type)
    error_message = "load_balancer_type must be lb11, lb21 or lb31."
  }
}

variable "certificate_ids" {
  description = "IDs of Hetzner certificates for an HTTPS (443) service. Empty (the default): only HTTP on 80."
  type        = list(number)
  default     = []
}

variable "health_file" {
  description = "Path of ha/health.json, which defines the load balancer's health check (checks.mirror_ready, with the cloud LB's timings in its cloud_lb). Null (the default): the repository's ha/health.json, found relative to modules/layout. Set it when this directory is vendored outside the repository."
  type        = string
  default     = null
}

variable "mirror_port" {
  description = "Port `plc serve` listens on (PLC_PORT); the load balancer's destination and health-check port. Null (the default): mirror_ready.port of ha/health.json (2582)."
  type        = number
  default     = null
}

variable "health_check_path" {
  description = "Path of the load balancer's HTTP health check. Null (the default): mirror_ready.path of ha/health.json (/-/ready, the mirror's readiness endpoint: 200 when the database answers and the ingest lag is within bound, else 503)."
  type        = string
  default     = null
}

variable "health_check_interval" {
  description = "Seconds between health checks (must exceed the timeout). Null (the default): mirror_ready.cloud_lb.interval_s of ha/health.json (10)."
  type        = number
  default     = null
}

variable "health_check_timeout" {
  description = "Seconds one health check may take; at least 3, since /-/ready may wait 2 s on the database. Null (the default): mirror_ready.cloud_lb.timeout_s of ha/health.json (5)."
  type        = number
  default     = null
}

variable "health_check_retries" {
  description = "Failed checks in a row before a node is taken out of the load balancer. Null (the default): mirror_ready.cloud_lb.retries of ha/health.json (3)."
  type        = number
  default     = null
}

################################################################################
# Floating IP
################################################################################

variable "floating_ip" {
  description = "Create an IPv4 floating IP in the first location and assign it to node 1 (later moves are not undone by Terraform)."
  type        = bool
  default     = false
}
