################################################################################
# Layout of the test hosts (passed to modules/layout, which validates them)
################################################################################

variable "name_prefix" {
  description = "Prefix of the test host names (<name_prefix>-node-<i>, <name_prefix>-balancer-<i>)."
  type        = string
  default     = "plc"
}

variable "node_count" {
  description = "Number of test nodes (etcd + PostgreSQL/Patroni + plc mirror each); odd, 3 to 9."
  type        = number
  default     = 3
}

variable "balancer_count" {
  description = "Number of balancer test hosts (HAProxy standing in for the cloud load balancer)."
  type        = number
  default     = 1
}

variable "subnet_cidr" {
  description = "Subnet the test hosts are addressed from. The default matches the network-namespace layout measured in /work/shared/spec/ha-notes.md §6 (10.77.0.0/24)."
  type        = string
  default     = "10.77.0.0/24"
}

variable "admin_cidrs" {
  description = "CIDRs allowed to SSH to the test hosts (the controller's side of the test network)."
  type        = list(string)
  default     = ["10.77.0.0/24"]
}

################################################################################
# Commands (ansible/scripts/hosts-up, ansible/site.yml, ansible/scripts/hosts-down)
################################################################################

variable "up_command" {
  description = "Shell command, run from the repository root, that brings the test hosts up. Environment: PLC_INVENTORY (path of the rendered inventory), PLC_HOSTS (JSON: host name -> {private_ip, role, location, ...})."
  type        = string
  default     = "ansible/scripts/hosts-up \"$PLC_INVENTORY\""

  validation {
    condition     = length(trimspace(var.up_command)) > 0
    error_message = "up_command must not be empty."
  }
}

variable "playbook_command" {
  description = "Shell command, run from the repository root after up_command, that provisions the hosts. Same environment as up_command."
  type        = string
  default     = "ANSIBLE_CONFIG=ansible/ansible.cfg ansible-playbook -i \"$PLC_INVENTORY\" ansible/site.yml"

  validation {
    condition     = length(trimspace(var.playbook_command)) > 0
    error_message = "playbook_command must not be empty."
  }
}

variable "down_command" {
  description = "Shell command, run from the repository root on `terraform destroy`, that removes the test hosts. Same environment as up_command."
  type        = string
  default     = "ansible/scripts/hosts-down \"$PLC_INVENTORY\""

  validation {
    condition     = length(trimspace(var.down_command)) > 0
    error_message = "down_command must not be empty."
  }
}

variable "inventory_path" {
  description = "Where the rendered Ansible inventory is written. Null: terraform/local/.generated/inventory.yml (git-ignored)."
  type        = string
  default     = null
}
