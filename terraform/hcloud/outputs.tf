output "nodes" {
  description = "Nodes by host name: location, private_ip, public ipv4 and ipv6 address, server id."
  value = {
    for name, n in module.layout.nodes : name => {
      location     = n.location
      private_ip   = n.private_ip
      ipv4_address = hcloud_server.node[name].ipv4_address
      ipv6_address = hcloud_server.node[name].ipv6_address
      server_id    = hcloud_server.node[name].id
    }
  }
}

output "load_balancer_ipv4" {
  description = "Public IPv4 address of the load balancer (point the mirror's DNS name here)."
  value       = hcloud_load_balancer.this.ipv4
}

output "load_balancer_ipv6" {
  description = "Public IPv6 address of the load balancer."
  value       = hcloud_load_balancer.this.ipv6
}

output "load_balancer_private_ip" {
  description = "Private address of the load balancer in the subnet."
  value       = module.layout.load_balancer_private_ip
}

output "floating_ip" {
  description = "The floating IPv4 address, or null when floating_ip is false."
  value       = var.floating_ip ? hcloud_floating_ip.this[0].ip_address : null
}

output "network_id" {
  description = "ID of the private network."
  value       = hcloud_network.this.id
}

output "health_check" {
  description = "The load balancer health check in use (from modules/layout)."
  value       = module.layout.health_check
}

output "firewall_rules" {
  description = "Every rule that must be open (from modules/layout); only the public ones are in the Hetzner firewall, the private ones are for the hosts' own firewall."
  value       = module.layout.firewall_rules
}

output "ansible_inventory" {
  description = "Ansible inventory (YAML): groups etcd, postgres, plc (every node) and balancers (empty: the cloud load balancer balances), ansible_host = public IPv4, private_ip host var. Save it with `terraform output -raw ansible_inventory > inventory.yml`."
  value       = module.layout.ansible_inventory
}
