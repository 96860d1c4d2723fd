locals {
  # Hetzner Cloud location -> network zone. A private network subnet belongs to one zone,
  # and servers can only join a subnet of their own location's zone.
  network_zones = {
    fsn1 = "eu-central"
    nbg1 = "eu-central"
    hel1 = "eu-central"
    ash  = "us-east"
    hil  = "us-west"
    sin  = "ap-southeast"
  }
  network_zone = try(local.network_zones[var.locations[0]], null)

  # Ports that are fixed by the stack (not variables): etcd, PostgreSQL, Patroni REST.
  etcd_client_port = 2379
  etcd_peer_port   = 2380
  postgres_port    = 5432
  patroni_port     = 8008

  # ---------------------------------------------------------------------------
  # Hosts. Keys are the stable host names, so a root module's for_each never
  # renumbers a server when another one is added or removed.
  # ---------------------------------------------------------------------------
  nodes = {
    for i in range(1, var.node_count + 1) :
    "${var.name_prefix}-node-${i}" => {
      name       = "${var.name_prefix}-node-${i}"
      role       = "node"
      index      = i
      location   = var.locations[(i - 1) % length(var.locations)]
      private_ip = cidrhost(var.subnet_cidr, var.ip_offsets.node + i)
      groups     = ["etcd", "postgres", "plc"]
    }
  }

  balancers = {
    for i in range(1, var.balancer_count + 1) :
    "${var.name_prefix}-balancer-${i}" => {
      name       = "${var.name_prefix}-balancer-${i}"
      role       = "balancer"
      index      = i
      location   = var.locations[(i - 1) % length(var.locations)]
      private_ip = cidrhost(var.subnet_cidr, var.ip_offsets.balancer + i)
      groups     = ["balancers"]
    }
  }

  hosts      = merge(local.nodes, local.balancers)
  host_names = concat([for i in range(1, var.node_count + 1) : "${var.name_prefix}-node-${i}"], [for i in range(1, var.balancer_count + 1) : "${var.name_prefix}-balancer-${i}"])

  load_balancer_private_ip = cidrhost(var.subnet_cidr, var.ip_offsets.load_balancer)

  # Nodes per location, and whether losing any one location still leaves an etcd
  # majority (checked, as a warning, by check.location_quorum).
  nodes_per_location = { for l in var.locations : l => length([for n in local.nodes : n if n.location == l]) }
  quorum_survives_location_loss = (
    var.node_count - max(values(local.nodes_per_location)...) > var.node_count / 2
  )

  # ---------------------------------------------------------------------------
  # Health check of the cloud load balancer: ha/health.json's mirror_ready check
  # (the mirror's readiness endpoint) with the cloud LB's own timings from its
  # cloud_lb object. A variable that is not null overrides one value.
  # ---------------------------------------------------------------------------
  health_file  = var.health_file != null ? var.health_file : "${path.module}/../../../ha/health.json"
  health       = jsondecode(file(local.health_file))
  mirror_ready = local.health.checks.mirror_ready
  mirror_port  = var.mirror_port != null ? var.mirror_port : local.mirror_ready.port

  health_check = {
    protocol     = "http" # every check in health.json is plain HTTP GET
    port         = local.mirror_port
    path         = var.health_check_path != null ? var.health_check_path : local.mirror_ready.path
    interval     = var.health_check_interval != null ? var.health_check_interval : local.mirror_ready.cloud_lb.interval_s
    timeout      = var.health_check_timeout != null ? var.health_check_timeout : local.mirror_ready.cloud_lb.timeout_s
    retries      = var.health_check_retries != null ? var.health_check_retries : local.mirror_ready.cloud_lb.retries
    status_codes = [tostring(local.mirror_ready.expect_status)]
  }

  # ---------------------------------------------------------------------------
  # Firewall: everything that must be open, nothing else. `network` says where the
  # rule is enforced: "public" rules belong on the public interface (a cloud
  # firewall); "private" rules are for traffic inside the private network, which a
  # Hetzner Cloud firewall does not filter, so they are for the hosts' own firewall
  # (nftables, configured by Ansible). `roles` lists who receives the traffic:
  # "node", "balancer" (balancer hosts) or "load_balancer" (the cloud LB service).
  # ---------------------------------------------------------------------------
  firewall_rules = [
    {
      name        = "ssh"
      description = "SSH from the admin networks"
      protocol    = "tcp"
      port        = "22"
      source_ips  = var.admin_cidrs
      network     = "public"
      roles       = ["node", "balancer"]
    },
    {
      name        = "http"
      description = "HTTP to the load balancer"
      protocol    = "tcp"
      port        = "80"
      source_ips  = var.public_cidrs
      network     = "public"
      roles       = ["load_balancer", "balancer"]
    },
    {
      name        = "https"
      description = "HTTPS to the load balancer"
      protocol    = "tcp"
      port        = "443"
      source_ips  = var.public_cidrs
      network     = "public"
      roles       = ["load_balancer", "balancer"]
    },
    {
      name        = "etcd-client"
      description = "etcd client API (Patroni) inside the private network"
      protocol    = "tcp"
      port        = tostring(local.etcd_client_port)
      source_ips  = [var.subnet_cidr]
      network     = "private"
      roles       = ["node"]
    },
    {
      name        = "etcd-peer"
      description = "etcd peer traffic inside the private network"
      protocol    = "tcp"
      port        = tostring(local.etcd_peer_port)
      source_ips  = [var.subnet_cidr]
      network     = "private"
      roles       = ["node"]
    },
    {
      name        = "postgres"
      description = "PostgreSQL (replication, mirrors, balancers) inside the private network"
      protocol    = "tcp"
      port        = tostring(local.postgres_port)
      source_ips  = [var.subnet_cidr]
      network     = "private"
      roles       = ["node"]
    },
    {
      name        = "patroni"
      description = "Patroni REST API (leader checks) inside the private network"
      protocol    = "tcp"
      port        = tostring(local.patroni_port)
      source_ips  = [var.subnet_cidr]
      network     = "private"
      roles       = ["node"]
    },
    {
      name        = "plc-mirror"
      description = "plc mirror HTTP (load balancer traffic and health checks) inside the private network"
      protocol    = "tcp"
      port        = tostring(local.mirror_port)
      source_ips  = [var.subnet_cidr]
      network     = "private"
      roles       = ["node"]
    },
  ]

  # The public rules of each server role, in the shape of an hcloud_firewall `rule`.
  cloud_firewall_rules = {
    for role in ["node", "balancer"] : role => [
      for r in local.firewall_rules : {
        description = r.description
        direction   = "in"
        protocol    = r.protocol
        port        = r.port
        source_ips  = r.source_ips
      } if r.network == "public" && contains(r.roles, role)
    ]
  }

  # ---------------------------------------------------------------------------
  # Ansible inventory (YAML). Host variables are set once under all.hosts; the
  # groups only list members.
  # ---------------------------------------------------------------------------
  inventory_groups = {
    etcd      = keys(local.nodes)
    postgres  = keys(local.nodes)
    plc       = keys(local.nodes)
    balancers = keys(local.balancers)
  }

  ansible_inventory = templatefile("${path.module}/templates/inventory.yaml.tftpl", {
    hosts = {
      for name, h in local.hosts : name => merge(h, {
        ansible_host = lookup(var.public_ips, name, null)
      })
    }
    groups = local.inventory_groups
    vars = {
      ansible_python_interpreter = var.ansible_python_interpreter
      plc_mirror_port            = local.mirror_port
      plc_health_check_path      = local.health_check.path
      private_network_cidr       = var.subnet_cidr
      etcd_client_port           = local.etcd_client_port
      etcd_peer_port             = local.etcd_peer_port
      postgres_port              = local.postgres_port
      patroni_port               = local.patroni_port
      admin_cidrs                = var.admin_cidrs
      private_tcp_ports          = [for r in local.firewall_rules : tonumber(r.port) if r.network == "private"]
    }
  })
}

# A warning, not an error: spreading 3 nodes over 2 locations works, but losing the
# location with 2 of them stops etcd (and with it Patroni failover).
check "location_quorum" {
  assert {
    condition     = local.quorum_survives_location_loss
    error_message = "Losing the location with the most nodes would leave etcd without a majority (nodes per location: ${jsonencode(local.nodes_per_location)}). Use at least 3 locations, or more nodes."
  }
}
