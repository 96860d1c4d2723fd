# Layout, naming, addresses, health check, firewall and inventory of the layout module.
# Offline: the module has no providers, so every run is a plan of locals and outputs.

variables {
  admin_cidrs = ["203.0.113.7/32"]
}

run "default_layout_three_nodes_three_locations" {
  command = plan

  assert {
    condition     = keys(output.nodes) == ["plc-node-1", "plc-node-2", "plc-node-3"]
    error_message = "Nodes are not named <name_prefix>-node-<i> from 1."
  }
  assert {
    condition     = [for n in values(output.nodes) : n.location] == ["fsn1", "nbg1", "hel1"]
    error_message = "Nodes are not spread round-robin over the locations."
  }
  assert {
    condition     = [for n in values(output.nodes) : n.private_ip] == ["10.42.1.11", "10.42.1.12", "10.42.1.13"]
    error_message = "Node i must get host number ip_offsets.node + i of subnet_cidr."
  }
  assert {
    condition     = alltrue([for n in values(output.nodes) : n.role == "node" && n.groups == ["etcd", "postgres", "plc"]])
    error_message = "Every node runs etcd, postgres and plc."
  }
  assert {
    condition     = output.balancers == {} && length(output.hosts) == 3
    error_message = "No balancer hosts by default."
  }
  assert {
    condition     = output.network_zone == "eu-central"
    error_message = "fsn1/nbg1/hel1 are in eu-central."
  }
  assert {
    condition     = output.load_balancer_private_ip == "10.42.1.5" && output.load_balancer_location == "fsn1"
    error_message = "The load balancer gets host number 5 and the first location."
  }
  assert {
    condition     = output.quorum_survives_location_loss
    error_message = "One node per location survives the loss of a location."
  }
}

run "health_check_comes_from_health_json" {
  command = plan

  # ha/health.json, read here on its own (relative to this module, where terraform test runs).
  assert {
    condition = output.health_check == {
      protocol     = "http"
      port         = jsondecode(file("../../../ha/health.json")).checks.mirror_ready.port
      path         = jsondecode(file("../../../ha/health.json")).checks.mirror_ready.path
      interval     = jsondecode(file("../../../ha/health.json")).checks.mirror_ready.cloud_lb.interval_s
      timeout      = jsondecode(file("../../../ha/health.json")).checks.mirror_ready.cloud_lb.timeout_s
      retries      = jsondecode(file("../../../ha/health.json")).checks.mirror_ready.cloud_lb.retries
      status_codes = [tostring(jsondecode(file("../../../ha/health.json")).checks.mirror_ready.expect_status)]
    }
    error_message = "Default health check must be ha/health.json's mirror_ready (port, path, expect_status) with its cloud_lb interval/timeout/retries."
  }
  assert {
    condition     = output.mirror_port == jsondecode(file("../../../ha/health.json")).checks.mirror_ready.port
    error_message = "The default mirror port is mirror_ready.port of ha/health.json."
  }
  assert {
    condition     = output.health_check.path == "/-/ready" && output.health_check.status_codes == ["200"]
    error_message = "The cloud load balancer must probe the mirror's readiness endpoint and expect 200."
  }
}

run "health_check_follows_health_file" {
  command = plan

  variables {
    health_file = "tests/fixtures/health-other.json"
  }

  assert {
    condition = output.health_check == {
      protocol     = "http"
      port         = 8181
      path         = "/readyz"
      interval     = 20
      timeout      = 7
      retries      = 4
      status_codes = ["204"]
    }
    error_message = "The health check must follow every value health_file gives (mirror_ready and its cloud_lb)."
  }
  assert {
    condition     = output.mirror_port == 8181 && one([for r in output.firewall_rules : r.port if r.name == "plc-mirror"]) == "8181"
    error_message = "The mirror port and its firewall rule must follow health_file."
  }
  assert {
    condition     = yamldecode(output.ansible_inventory).all.vars.plc_mirror_port == 8181 && yamldecode(output.ansible_inventory).all.vars.plc_health_check_path == "/readyz"
    error_message = "The inventory's mirror port and health-check path must follow health_file."
  }
}

run "health_check_follows_its_variables" {
  command = plan

  variables {
    mirror_port           = 8080
    health_check_path     = "/healthz"
    health_check_interval = 15
    health_check_timeout  = 4
    health_check_retries  = 5
  }

  assert {
    condition     = output.health_check.port == 8080 && output.health_check.path == "/healthz" && output.health_check.interval == 15 && output.health_check.timeout == 4 && output.health_check.retries == 5
    error_message = "Health check does not follow its variables."
  }
  assert {
    condition     = one([for r in output.firewall_rules : r.port if r.name == "plc-mirror"]) == "8080"
    error_message = "The mirror's private firewall rule must follow mirror_port."
  }
}

run "five_nodes_wrap_round_robin" {
  command = plan

  variables {
    node_count  = 5
    name_prefix = "mirror-eu"
  }

  assert {
    condition     = [for n in values(output.nodes) : "${n.name}@${n.location}=${n.private_ip}"] == ["mirror-eu-node-1@fsn1=10.42.1.11", "mirror-eu-node-2@nbg1=10.42.1.12", "mirror-eu-node-3@hel1=10.42.1.13", "mirror-eu-node-4@fsn1=10.42.1.14", "mirror-eu-node-5@nbg1=10.42.1.15"]
    error_message = "Five nodes must wrap around the three locations in order."
  }
  assert {
    condition     = output.quorum_survives_location_loss
    error_message = "2+2+1 nodes: losing 2 leaves 3 of 5."
  }
}

run "balancers_named_and_addressed_apart_from_nodes" {
  command = plan

  variables {
    balancer_count = 2
    subnet_cidr    = "10.42.7.0/24"
    ip_offsets     = { node = 20, balancer = 200 }
  }

  assert {
    condition     = keys(output.balancers) == ["plc-balancer-1", "plc-balancer-2"]
    error_message = "Balancers are named <name_prefix>-balancer-<i>."
  }
  assert {
    condition     = [for b in values(output.balancers) : "${b.location}=${b.private_ip}"] == ["fsn1=10.42.7.201", "nbg1=10.42.7.202"]
    error_message = "Balancers are spread round-robin and addressed from ip_offsets.balancer."
  }
  assert {
    condition     = output.nodes["plc-node-1"].private_ip == "10.42.7.21" && output.load_balancer_private_ip == "10.42.7.5"
    error_message = "Node and load balancer offsets must apply (load_balancer keeps its default of 5)."
  }
  assert {
    condition     = alltrue([for b in values(output.balancers) : b.role == "balancer" && b.groups == ["balancers"]])
    error_message = "Balancers are only in the balancers group."
  }
  assert {
    condition     = length(distinct([for h in values(output.hosts) : h.private_ip])) == 5
    error_message = "No two hosts may share a private address."
  }
}

run "firewall_opens_only_what_is_needed" {
  command = plan

  variables {
    admin_cidrs = ["203.0.113.0/24", "2001:db8::/48"]
  }

  assert {
    condition     = sort([for r in output.firewall_rules : "${r.network}:${r.port}"]) == sort(["public:22", "public:80", "public:443", "private:2379", "private:2380", "private:5432", "private:8008", "private:2582"])
    error_message = "The rule list must be exactly 22/80/443 public and 2379/2380/5432/8008/2582 private."
  }
  assert {
    condition     = one([for r in output.firewall_rules : r.source_ips if r.port == "22"]) == tolist(["203.0.113.0/24", "2001:db8::/48"])
    error_message = "SSH must be open to the admin CIDRs only."
  }
  assert {
    condition     = alltrue([for r in output.firewall_rules : r.source_ips == ["10.42.1.0/24"] && r.roles == ["node"] if r.network == "private"])
    error_message = "Cluster ports must be open only from the private subnet, and only on nodes."
  }
  assert {
    condition     = alltrue([for r in output.firewall_rules : !contains(r.roles, "node") if contains(["80", "443"], r.port)])
    error_message = "80/443 go to the load balancer, never to the nodes."
  }
  assert {
    condition     = jsonencode(output.cloud_firewall_rules.node) == jsonencode([{ description = "SSH from the admin networks", direction = "in", protocol = "tcp", port = "22", source_ips = ["203.0.113.0/24", "2001:db8::/48"] }])
    error_message = "A node's cloud (public) firewall must open only SSH from the admin CIDRs."
  }
  assert {
    condition     = [for r in output.cloud_firewall_rules.balancer : r.port] == ["22", "80", "443"] && output.cloud_firewall_rules.balancer[1].source_ips == tolist(["0.0.0.0/0", "::/0"])
    error_message = "A balancer host's public firewall opens SSH plus 80/443 from public_cidrs."
  }
}

run "inventory_groups_and_host_vars" {
  command = plan

  variables {
    balancer_count = 1
    public_ips = {
      "plc-node-1"     = "198.51.100.1"
      "plc-node-2"     = "198.51.100.2"
      "plc-node-3"     = "2001:db8::3"
      "plc-balancer-1" = "198.51.100.9"
    }
  }

  assert {
    condition     = keys(yamldecode(output.ansible_inventory).all.children) == ["balancers", "etcd", "plc", "postgres"]
    error_message = "The inventory must have exactly the groups balancers, etcd, plc, postgres."
  }
  assert {
    condition     = alltrue([for g in ["etcd", "postgres", "plc"] : keys(yamldecode(output.ansible_inventory).all.children[g].hosts) == ["plc-node-1", "plc-node-2", "plc-node-3"]])
    error_message = "etcd, postgres and plc must each hold every node."
  }
  assert {
    condition     = keys(yamldecode(output.ansible_inventory).all.children.balancers.hosts) == ["plc-balancer-1"]
    error_message = "balancers must hold the balancer host."
  }
  assert {
    condition = yamldecode(output.ansible_inventory).all.hosts["plc-node-2"] == {
      ansible_host = "198.51.100.2"
      private_ip   = "10.42.1.12"
      location     = "nbg1"
      plc_role     = "node"
    }
    error_message = "Host vars must be ansible_host (public IP), private_ip, location, plc_role."
  }
  assert {
    condition     = yamldecode(output.ansible_inventory).all.hosts["plc-node-3"].ansible_host == "2001:db8::3"
    error_message = "An IPv6 public address must come through unchanged."
  }
  assert {
    condition     = yamldecode(output.ansible_inventory).all.hosts["plc-balancer-1"].private_ip == "10.42.1.101"
    error_message = "Balancer host vars are wrong."
  }
  assert {
    condition     = yamldecode(output.ansible_inventory).all.vars.plc_mirror_port == 2582 && yamldecode(output.ansible_inventory).all.vars.private_network_cidr == "10.42.1.0/24" && yamldecode(output.ansible_inventory).all.vars.ansible_python_interpreter == "/usr/bin/python3"
    error_message = "Shared settings must be under all.vars."
  }
  assert {
    condition     = yamldecode(output.ansible_inventory).all.vars.private_tcp_ports == [2379, 2380, 5432, 8008, 2582]
    error_message = "private_tcp_ports must list the private rules' ports as numbers."
  }
}

run "inventory_without_public_ips_and_balancers" {
  command = plan

  assert {
    condition     = alltrue([for h in values(yamldecode(output.ansible_inventory).all.hosts) : !contains(keys(h), "ansible_host")])
    error_message = "Hosts without a public IP get no ansible_host."
  }
  assert {
    condition     = yamldecode(output.ansible_inventory).all.children.balancers.hosts == {}
    error_message = "An empty balancers group must still be a valid, empty group."
  }
}

run "single_zone_outside_europe" {
  command = plan

  variables {
    locations    = ["ash"]
    network_cidr = "172.16.0.0/12"
    subnet_cidr  = "172.20.3.0/24"
  }

  # Three nodes in one location: allowed, but the quorum check warns.
  expect_failures = [check.location_quorum]

  assert {
    condition     = output.network_zone == "us-east" && alltrue([for n in values(output.nodes) : n.location == "ash"])
    error_message = "ash is in us-east and takes every node."
  }
  assert {
    condition     = output.nodes["plc-node-3"].private_ip == "172.20.3.13"
    error_message = "Addresses must come from subnet_cidr."
  }
}

run "two_locations_warn_about_quorum" {
  command = plan

  variables {
    locations = ["fsn1", "nbg1"]
  }

  expect_failures = [check.location_quorum]

  assert {
    condition     = !output.quorum_survives_location_loss
    error_message = "2+1 nodes: losing fsn1 leaves 1 of 3, no majority."
  }
}
