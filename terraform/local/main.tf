# Local test target: no cloud, no provider. The layout module gives the hosts, their
# addresses and the Ansible inventory; built-in terraform_data resources run shell
# commands to write the inventory, bring the test hosts up, run the playbook, and (on
# destroy) take the hosts down.
#
# The default commands are ansible/scripts/hosts-up (namespace test hosts on this
# machine), ansible/site.yml and ansible/scripts/hosts-down (see terraform/README.md).

locals {
  repo_root      = abspath("${path.module}/../..")
  inventory_path = coalesce(var.inventory_path, abspath("${path.module}/.generated/inventory.yml"))
}

module "layout" {
  source = "../modules/layout"

  name_prefix    = var.name_prefix
  node_count     = var.node_count
  balancer_count = var.balancer_count
  locations      = ["fsn1", "nbg1", "hel1"] # labels only here: every test host is on this machine
  network_cidr   = var.subnet_cidr
  subnet_cidr    = var.subnet_cidr
  admin_cidrs    = var.admin_cidrs
  # mirror_port and the health check are left null: they come from ha/health.json,
  # as the HAProxy config that plc/cluster/render.py renders does.
  # The controller reaches test hosts on their private addresses.
  public_ips = { for name, h in module.layout.hosts : name => h.private_ip }
}

locals {
  command_env = {
    PLC_INVENTORY = local.inventory_path
    PLC_HOSTS     = jsonencode(module.layout.hosts)
  }
}

# Writes the inventory file whenever its text changes.
resource "terraform_data" "inventory" {
  triggers_replace = [module.layout.ansible_inventory, local.inventory_path]
  input            = local.inventory_path

  provisioner "local-exec" {
    command = "mkdir -p \"$(dirname \"$PLC_INVENTORY\")\" && printf '%s' \"$PLC_INVENTORY_TEXT\" > \"$PLC_INVENTORY\""
    environment = {
      PLC_INVENTORY      = local.inventory_path
      PLC_INVENTORY_TEXT = module.layout.ansible_inventory
    }
  }
}

# Brings the test hosts up; takes them down on destroy. A destroy-time provisioner may
# only read `self`, so the command, directory and environment travel in `input`.
resource "terraform_data" "hosts" {
  triggers_replace = [module.layout.hosts]

  input = {
    down_command = var.down_command
    working_dir  = local.repo_root
    environment  = local.command_env
  }

  provisioner "local-exec" {
    command     = var.up_command
    working_dir = local.repo_root
    environment = local.command_env
  }

  provisioner "local-exec" {
    when        = destroy
    command     = self.input.down_command
    working_dir = self.input.working_dir
    environment = self.input.environment
  }

  depends_on = [terraform_data.inventory]
}

# Runs the playbook after the hosts are up, and again whenever the inventory or the
# command changes.
resource "terraform_data" "playbook" {
  triggers_replace = [module.layout.ansible_inventory, var.playbook_command, terraform_data.hosts.id]

  provisioner "local-exec" {
    command     = var.playbook_command
    working_dir = local.repo_root
    environment = local.command_env
  }
}
