# Hetzner Cloud deployment of the plc mirror. The layout (names, locations, private
# addresses, firewall rules, health check, inventory) comes from ../modules/layout;
# this file only turns it into hcloud resources.
#
# Never initialised or planned here (no registry access): only `terraform fmt -check`
# and the static checks in tests/test_terraform.py have run against it.

provider "hcloud" {
  # The token comes from var.hcloud_token or, when that is null, from HCLOUD_TOKEN.
  token = var.hcloud_token
}

module "layout" {
  source = "../modules/layout"

  name_prefix           = var.name_prefix
  node_count            = var.node_count
  balancer_count        = 0 # the hcloud_load_balancer below is the balancer
  locations             = var.locations
  network_cidr          = var.network_cidr
  subnet_cidr           = var.subnet_cidr
  admin_cidrs           = var.admin_cidrs
  public_cidrs          = var.public_cidrs
  health_file           = var.health_file # this and the five below: null = from ha/health.json
  mirror_port           = var.mirror_port
  health_check_path     = var.health_check_path
  health_check_interval = var.health_check_interval
  health_check_timeout  = var.health_check_timeout
  health_check_retries  = var.health_check_retries
  public_ips            = { for name, s in hcloud_server.node : name => s.ipv4_address }
}

locals {
  labels = merge(var.labels, {
    "app"         = "plc-mirror"
    "name-prefix" = var.name_prefix
  })
}

################################################################################
# Private network
################################################################################

resource "hcloud_network" "this" {
  name     = "${var.name_prefix}-net"
  ip_range = module.layout.network_cidr
  labels   = local.labels
}

resource "hcloud_network_subnet" "this" {
  network_id   = hcloud_network.this.id
  type         = "cloud"
  network_zone = module.layout.network_zone
  ip_range     = module.layout.subnet_cidr
}

################################################################################
# Nodes (etcd + PostgreSQL/Patroni + plc mirror), keyed by stable host name
################################################################################

resource "hcloud_placement_group" "nodes" {
  name   = "${var.name_prefix}-nodes"
  type   = "spread"
  labels = local.labels
}

resource "hcloud_ssh_key" "this" {
  for_each = var.ssh_public_keys

  name       = "${var.name_prefix}-${each.key}"
  public_key = each.value
  labels     = local.labels
}

resource "hcloud_server" "node" {
  for_each = module.layout.nodes

  name               = each.value.name
  server_type        = var.server_type
  image              = var.image
  location           = each.value.location
  placement_group_id = hcloud_placement_group.nodes.id
  ssh_keys           = concat([for k in hcloud_ssh_key.this : k.id], var.ssh_key_ids)
  firewall_ids       = [hcloud_firewall.nodes.id]
  labels             = merge(local.labels, { "role" = each.value.role })

  public_net {
    ipv4_enabled = true
    ipv6_enabled = true
  }

  network {
    network_id = hcloud_network.this.id
    ip         = each.value.private_ip
  }

  # The server must not come up before its subnet exists.
  depends_on = [hcloud_network_subnet.this]

  lifecycle {
    # Images are updated in place by Ansible, not by replacing the server.
    ignore_changes = [image, ssh_keys]
  }
}

################################################################################
# Cloud firewall: the layout's public rules for nodes (SSH from admin_cidrs only).
# Hetzner Cloud firewalls do not filter private-network traffic, so the layout's
# "private" rules (etcd, PostgreSQL, Patroni, mirror) are left to the hosts' own
# firewall, which Ansible configures from the inventory.
################################################################################

resource "hcloud_firewall" "nodes" {
  name   = "${var.name_prefix}-nodes"
  labels = local.labels

  dynamic "rule" {
    for_each = module.layout.cloud_firewall_rules["node"]

    content {
      description = rule.value.description
      direction   = rule.value.direction
      protocol    = rule.value.protocol
      port        = rule.value.port
      source_ips  = rule.value.source_ips
    }
  }
}

################################################################################
# Load balancer: HTTP 80 (and HTTPS 443 with certificates) -> mirror_port on the
# nodes' private addresses, health-checked on the mirror's readiness endpoint.
################################################################################

resource "hcloud_load_balancer" "this" {
  name               = "${var.name_prefix}-lb"
  load_balancer_type = var.load_balancer_type
  location           = module.layout.load_balancer_location
  labels             = local.labels
}

resource "hcloud_load_balancer_network" "this" {
  load_balancer_id = hcloud_load_balancer.this.id
  network_id       = hcloud_network.this.id
  ip               = module.layout.load_balancer_private_ip

  # Clients reach the LB on its public address; it reaches the targets privately.
  enable_public_interface = true

  depends_on = [hcloud_network_subnet.this]
}

resource "hcloud_load_balancer_target" "node" {
  for_each = hcloud_server.node

  type             = "server"
  load_balancer_id = hcloud_load_balancer.this.id
  server_id        = each.value.id
  use_private_ip   = true

  depends_on = [hcloud_load_balancer_network.this]
}

resource "hcloud_load_balancer_service" "http" {
  load_balancer_id = hcloud_load_balancer.this.id
  protocol         = "http"
  listen_port      = 80
  destination_port = module.layout.mirror_port

  health_check {
    protocol = module.layout.health_check.protocol
    port     = module.layout.health_check.port
    interval = module.layout.health_check.interval
    timeout  = module.layout.health_check.timeout
    retries  = module.layout.health_check.retries

    http {
      path         = module.layout.health_check.path
      status_codes = module.layout.health_check.status_codes
    }
  }
}

resource "hcloud_load_balancer_service" "https" {
  count = length(var.certificate_ids) > 0 ? 1 : 0

  load_balancer_id = hcloud_load_balancer.this.id
  protocol         = "https"
  listen_port      = 443
  destination_port = module.layout.mirror_port

  http {
    certificates = var.certificate_ids
  }

  health_check {
    protocol = module.layout.health_check.protocol
    port     = module.layout.health_check.port
    interval = module.layout.health_check.interval
    timeout  = module.layout.health_check.timeout
    retries  = module.layout.health_check.retries

    http {
      path         = module.layout.health_check.path
      status_codes = module.layout.health_check.status_codes
    }
  }
}

################################################################################
# Optional floating IP, first assigned to node 1. Moving it (e.g. to follow the
# Patroni leader) is left to operations, so Terraform ignores later reassignments.
################################################################################

resource "hcloud_floating_ip" "this" {
  count = var.floating_ip ? 1 : 0

  name          = "${var.name_prefix}-fip"
  type          = "ipv4"
  home_location = module.layout.load_balancer_location
  labels        = local.labels
}

resource "hcloud_floating_ip_assignment" "this" {
  count = var.floating_ip ? 1 : 0

  floating_ip_id = hcloud_floating_ip.this[0].id
  server_id      = hcloud_server.node["${var.name_prefix}-node-1"].id

  lifecycle {
    ignore_changes = [server_id]
  }
}
