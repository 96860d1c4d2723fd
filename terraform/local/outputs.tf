output "hosts" {
  description = "Test hosts by name: role, index, location label, private_ip, Ansible groups."
  value       = module.layout.hosts
}

output "inventory_path" {
  description = "Path the Ansible inventory is written to."
  value       = local.inventory_path
}

output "ansible_inventory" {
  description = "The Ansible inventory text (ansible_host = private_ip for every test host)."
  value       = module.layout.ansible_inventory
}
