# Smallest use of terraform/hcloud: three nodes in fsn1, nbg1 and hel1 behind a load
# balancer. Export HCLOUD_TOKEN, set admin_cidrs to where you administer from, then
#   terraform init && terraform apply
#   terraform output -raw ansible_inventory > ../../../../ansible/inventory.yml
# Not run here: the hcloud provider cannot be downloaded in this environment.

terraform {
  required_version = ">= 1.9.0"

  required_providers {
    hcloud = {
      source  = "hetznercloud/hcloud"
      version = "~> 1.45"
    }
  }
}

variable "admin_cidrs" {
  description = "CIDRs allowed to SSH to the nodes."
  type        = list(string)
  default     = ["203.0.113.7/32"]
}

variable "ssh_public_key" {
  description = "OpenSSH public key installed on every node."
  type        = string
}

module "plc" {
  source = "../.."

  name_prefix     = "plc"
  node_count      = 3
  locations       = ["fsn1", "nbg1", "hel1"]
  admin_cidrs     = var.admin_cidrs
  ssh_public_keys = { admin = var.ssh_public_key }
}

output "load_balancer_ipv4" {
  description = "Public IPv4 address of the mirror's load balancer."
  value       = module.plc.load_balancer_ipv4
}

output "ansible_inventory" {
  description = "Ansible inventory for ansible/site.yml."
  value       = module.plc.ansible_inventory
}
