# Every validation rule in variables.tf, each with an input that breaks that rule and
# no other (expect_failures fails the run if anything else goes wrong). The positive
# side of each rule is covered by the defaults and the runs in layout.tftest.hcl.
# tests/test_terraform.py checks that every variable with a validation block is named in
# an expect_failures here.

variables {
  admin_cidrs = ["203.0.113.7/32"]
}

run "name_prefix_upper_case" {
  command = plan
  # upper case is not a valid host name

  variables {
    name_prefix = "Plc"
  }

  expect_failures = [var.name_prefix]
}

run "name_prefix_trailing_hyphen" {
  command = plan
  # a name may not end with a hyphen

  variables {
    name_prefix = "plc-"
  }

  expect_failures = [var.name_prefix]
}

run "node_count_fraction" {
  command = plan
  # rule: whole number

  variables {
    node_count = 3.5
  }

  expect_failures = [var.node_count]
}

run "node_count_below_three" {
  command = plan
  # rule: at least 3

  variables {
    node_count = 1
  }

  expect_failures = [var.node_count]
}

run "node_count_even" {
  command = plan
  # rule: odd

  variables {
    node_count = 4
  }

  expect_failures = [var.node_count]
}

run "node_count_above_nine" {
  command = plan
  # rule: at most 9

  variables {
    node_count = 11
  }

  expect_failures = [var.node_count]
}

run "balancer_count_negative" {
  command = plan

  variables {
    balancer_count = -1
  }

  expect_failures = [var.balancer_count]
}

run "locations_empty" {
  command = plan
  # rule: not empty

  variables {
    locations = []
  }

  expect_failures = [var.locations]
}

run "locations_unknown" {
  command = plan
  # rule: known Hetzner locations

  variables {
    locations = ["fsn1", "ams1"]
  }

  expect_failures = [var.locations]
}

run "locations_repeated" {
  command = plan
  # rule: no repeats

  variables {
    locations = ["fsn1", "fsn1", "nbg1"]
  }

  expect_failures = [var.locations]
}

run "locations_two_zones" {
  command = plan
  # rule: one network zone

  variables {
    locations = ["fsn1", "ash", "hel1"]
  }

  expect_failures = [var.locations]
}

run "network_cidr_not_a_cidr" {
  command = plan
  # rule: IPv4 CIDR

  variables {
    network_cidr = "10.42.0.0"
  }

  expect_failures = [var.network_cidr]
}

run "network_cidr_ipv6" {
  command = plan
  # rule: IPv4 CIDR (Hetzner networks are IPv4)

  variables {
    network_cidr = "fd00::/64"
  }

  expect_failures = [var.network_cidr]
}

run "network_cidr_host_bits" {
  command = plan
  # rule: host bits zero

  variables {
    network_cidr = "10.42.1.0/16"
  }

  expect_failures = [var.network_cidr]
}

run "network_cidr_public" {
  command = plan
  # rule: RFC 1918 (the subnet is moved along so only this rule fails)

  variables {
    network_cidr = "8.8.0.0/16"
    subnet_cidr  = "8.8.1.0/24"
  }

  expect_failures = [var.network_cidr]
}

run "subnet_cidr_not_a_cidr" {
  command = plan
  # rule: IPv4 CIDR

  variables {
    subnet_cidr = "10.42.1.0/40"
  }

  expect_failures = [var.subnet_cidr]
}

run "subnet_cidr_host_bits" {
  command = plan
  # rule: host bits zero

  variables {
    subnet_cidr = "10.42.1.5/24"
  }

  expect_failures = [var.subnet_cidr]
}

run "subnet_cidr_outside_network" {
  command = plan
  # rule: inside network_cidr

  variables {
    subnet_cidr = "10.43.1.0/24"
  }

  expect_failures = [var.subnet_cidr]
}

run "subnet_cidr_wider_than_network" {
  command = plan
  # rule: inside network_cidr (a wider prefix is not inside)

  variables {
    network_cidr = "10.42.1.0/24"
    subnet_cidr  = "10.42.0.0/16"
  }

  expect_failures = [var.subnet_cidr]
}

run "ip_offsets_on_gateway" {
  command = plan
  # rule: ranges apart and in order (.1 is the gateway)

  variables {
    ip_offsets = { load_balancer = 1 }
  }

  expect_failures = [var.ip_offsets]
}

run "ip_offsets_overlap" {
  command = plan
  # rule: ranges apart (node 3 would be host 13, balancer 1 host 13)

  variables {
    ip_offsets = { node = 10, balancer = 12 }
  }

  expect_failures = [var.ip_offsets]
}

run "ip_offsets_outside_subnet" {
  command = plan
  # rule: fits in the subnet (balancer 1 would be host 101 of a /28)

  variables {
    subnet_cidr    = "10.42.1.0/28"
    balancer_count = 1
  }

  expect_failures = [var.ip_offsets]
}

run "admin_cidrs_empty" {
  command = plan
  # rule: not empty

  variables {
    admin_cidrs = []
  }

  expect_failures = [var.admin_cidrs]
}

run "admin_cidrs_not_a_cidr" {
  command = plan
  # rule: CIDRs

  variables {
    admin_cidrs = ["office"]
  }

  expect_failures = [var.admin_cidrs]
}

run "admin_cidrs_whole_internet" {
  command = plan
  # rule: not the whole internet

  variables {
    admin_cidrs = ["203.0.113.7/32", "0.0.0.0/0"]
  }

  expect_failures = [var.admin_cidrs]
}

run "admin_cidrs_whole_internet_v6" {
  command = plan
  # rule: not the whole internet

  variables {
    admin_cidrs = ["::/0"]
  }

  expect_failures = [var.admin_cidrs]
}

run "public_cidrs_not_a_cidr" {
  command = plan

  variables {
    public_cidrs = ["anywhere"]
  }

  expect_failures = [var.public_cidrs]
}

run "public_cidrs_empty" {
  command = plan

  variables {
    public_cidrs = []
  }

  expect_failures = [var.public_cidrs]
}

run "mirror_port_out_of_range" {
  command = plan
  # rule: 1-65535

  variables {
    mirror_port = 70000
  }

  expect_failures = [var.mirror_port]
}

run "mirror_port_taken" {
  command = plan
  # rule: not a port the stack uses

  variables {
    mirror_port = 5432
  }

  expect_failures = [var.mirror_port]
}

run "health_check_path_relative" {
  command = plan

  variables {
    health_check_path = "-/ready"
  }

  expect_failures = [var.health_check_path]
}

run "health_check_interval_too_long" {
  command = plan

  variables {
    health_check_interval = 301
  }

  expect_failures = [var.health_check_interval]
}

run "health_check_interval_fraction" {
  command = plan

  variables {
    health_check_interval = 7.5
  }

  expect_failures = [var.health_check_interval]
}

run "health_check_timeout_below_probe" {
  command = plan
  # rule: at least 3 s

  variables {
    health_check_timeout = 2
  }

  expect_failures = [var.health_check_timeout]
}

run "health_check_timeout_not_below_interval" {
  command = plan
  # precondition on output.health_check: effective interval > effective timeout

  variables {
    health_check_interval = 10
    health_check_timeout  = 10
  }

  expect_failures = [output.health_check]
}

run "health_check_interval_below_timeout" {
  command = plan
  # precondition on output.health_check: interval > timeout (the timeout, 5, comes from ha/health.json)

  variables {
    health_check_interval = 4
  }

  expect_failures = [output.health_check]
}

run "health_file_missing" {
  command = plan
  # rule: a readable JSON file of ha/health.json's shape

  variables {
    health_file = "tests/fixtures/no-such-file.json"
  }

  expect_failures = [var.health_file]
}

run "health_file_without_cloud_lb" {
  command = plan
  # rule: a readable JSON file of ha/health.json's shape (mirror_ready.cloud_lb is missing)

  variables {
    health_file = "tests/fixtures/health-no-cloud-lb.json"
  }

  expect_failures = [var.health_file]
}

run "health_file_timeout_below_probe" {
  command = plan
  # precondition on output.health_check: health_file's own values in range (cloud_lb.timeout_s 2)

  variables {
    health_file = "tests/fixtures/health-short-timeout.json"
  }

  expect_failures = [output.health_check]
}

run "health_file_timeout_overridden" {
  command = plan
  # the same precondition judges health_file, not the override: a good variable does not hide a bad file

  variables {
    health_file          = "tests/fixtures/health-short-timeout.json"
    health_check_timeout = 5
  }

  expect_failures = [output.health_check]
}

run "health_check_retries_zero" {
  command = plan

  variables {
    health_check_retries = 0
  }

  expect_failures = [var.health_check_retries]
}

run "public_ips_unknown_host" {
  command = plan
  # rule: keys are this layout's host names

  variables {
    public_ips = { "plc-node-4" = "198.51.100.4" }
  }

  expect_failures = [var.public_ips]
}

run "public_ips_not_an_address" {
  command = plan
  # rule: values are IP addresses

  variables {
    public_ips = { "plc-node-1" = "999.1.1.1" }
  }

  expect_failures = [var.public_ips]
}

run "ansible_python_interpreter_relative" {
  command = plan

  variables {
    ansible_python_interpreter = "python3"
  }

  expect_failures = [var.ansible_python_interpreter]
}
