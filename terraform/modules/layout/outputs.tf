output "nodes" {
  description = "Mirror nodes keyed by host name (<name_prefix>-node-<i>): name, role (\"node\"), index (from 1), location, private_ip, groups (Ansible groups: etcd, postgres, plc)."
  value       = local.nodes
}

output "balancers" {
  description = "Balancer hosts keyed by host name (<name_prefix>-balancer-<i>), same fields as nodes; role \"balancer\", group balancers. Empty when balancer_count is 0."
  value       = local.balancers
}

output "hosts" {
  description = "nodes and balancers in one map keyed by host name."
  value       = local.hosts
}

output "network_zone" {
  description = "Hetzner network zone of the locations (e.g. eu-central), for the private subnet."
  value       = local.network_zone
}

output "network_cidr" {
  description = "IPv4 range of the private network (input echoed for the root module)."
  value       = var.network_cidr
}

output "subnet_cidr" {
  description = "IPv4 subnet the private addresses come from (input echoed for the root module)."
  value       = var.subnet_cidr
}

output "load_balancer_private_ip" {
  description = "Private address reserved for the cloud load balancer (host number ip_offsets.load_balancer of subnet_cidr)."
  value       = local.load_balancer_private_ip
}

output "load_balancer_location" {
  description = "Location for the cloud load balancer: the first of var.locations."
  value       = try(var.locations[0], null)
}

output "mirror_port" {
  description = "Port of the plc mirror on every node; the load balancer's destination port (mirror_port, or checks.mirror_ready.port of health_file)."
  value       = local.mirror_port
}

output "health_check" {
  description = "Load balancer health check, from health_file's checks.mirror_ready unless a variable overrides a value: protocol (http), port (the mirror port), path, interval, timeout, retries (from mirror_ready.cloud_lb; seconds/count), status_codes ([expect_status] as strings, [\"200\"])."
  value       = local.health_check

  # The variables validate themselves; this checks the values health_file supplies.
  precondition {
    condition = (
      floor(local.mirror_ready.port) == local.mirror_ready.port && local.mirror_ready.port >= 1 && local.mirror_ready.port <= 65535 &&
      can(regex("^/[^\\s]*$", local.mirror_ready.path)) &&
      floor(local.mirror_ready.expect_status) == local.mirror_ready.expect_status && local.mirror_ready.expect_status >= 100 && local.mirror_ready.expect_status <= 599 &&
      floor(local.mirror_ready.cloud_lb.interval_s) == local.mirror_ready.cloud_lb.interval_s && local.mirror_ready.cloud_lb.interval_s >= 1 && local.mirror_ready.cloud_lb.interval_s <= 300 &&
      floor(local.mirror_ready.cloud_lb.timeout_s) == local.mirror_ready.cloud_lb.timeout_s && local.mirror_ready.cloud_lb.timeout_s >= 3 &&
      floor(local.mirror_ready.cloud_lb.retries) == local.mirror_ready.cloud_lb.retries && local.mirror_ready.cloud_lb.retries >= 1 && local.mirror_ready.cloud_lb.retries <= 10
    )
    error_message = "checks.mirror_ready in ${local.health_file} is out of range for the cloud load balancer: port 1-65535, path starting with / without whitespace, expect_status 100-599, and in cloud_lb whole seconds interval_s 1-300 and timeout_s at least 3 (/-/ready may take up to 2 s), retries 1-10."
  }

  # On the effective values (variables or health_file), which is why it is not a validation.
  precondition {
    condition     = local.health_check.timeout < local.health_check.interval
    error_message = "The health check timeout (${local.health_check.timeout} s) must be shorter than its interval (${local.health_check.interval} s), so checks do not overlap: set health_check_timeout/health_check_interval, or mirror_ready.cloud_lb in ${local.health_file}."
  }
}

output "firewall_rules" {
  description = "Every rule that must be open: name, description, protocol, port (string), source_ips, network (\"public\": enforce on the public interface; \"private\": inside the private network, for the hosts' own firewall) and roles (node, balancer, load_balancer)."
  value       = local.firewall_rules
}

output "cloud_firewall_rules" {
  description = "The public rules per server role (keys node and balancer), shaped like hcloud_firewall rule blocks: description, direction, protocol, port, source_ips."
  value       = local.cloud_firewall_rules
}

output "quorum_survives_location_loss" {
  description = "Whether losing the location with the most nodes still leaves an etcd majority."
  value       = local.quorum_survives_location_loss
}

output "ansible_inventory" {
  description = "Ansible inventory (YAML text): host variables ansible_host (from public_ips, when given), private_ip, location, plc_role under all.hosts; groups etcd, postgres, plc, balancers; shared settings under all.vars."
  value       = local.ansible_inventory
}
