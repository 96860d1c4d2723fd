"""The Terraform code under terraform/, checked offline.

What runs (terraform 1.11 is on PATH in CI; no provider registry is reachable):
- ``terraform fmt -check -recursive terraform/``;
- modules/layout: ``terraform init -backend=false`` and ``terraform test`` (its tests/*.tftest.hcl),
  plus a check that every variable validation rule has an ``expect_failures`` run, and an apply of
  a tiny root that proves the load balancer health check is what ha/health.json says (and follows
  it when the file changes);
- local: ``terraform init`` and ``terraform validate``, and an apply/destroy in which the
  (not yet written) Ansible commands are replaced by shell commands that record what they were given;
- hcloud: a static check of the .tf text only (required resources, typed and described variables,
  pinned provider, outputs, wiring to modules/layout). It is never init'ed, validated or planned:
  the hcloud provider cannot be downloaded here.

Terraform runs in a temporary copy of terraform/ (next to a copy of ha/health.json, which the layout
module reads at ../../../ha/health.json) with its own TF_DATA_DIR, so the repository gets no
.terraform directory, state or lock file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TF_DIR = REPO / "terraform"
LAYOUT = TF_DIR / "modules" / "layout"
HCLOUD = TF_DIR / "hcloud"
LOCAL = TF_DIR / "local"
HEALTH_JSON = REPO / "ha" / "health.json"
TERRAFORM = shutil.which("terraform")
TF_TIMEOUT = 180  # seconds for any one terraform command (each takes well under a second here)

pytestmark = pytest.mark.skipif(TERRAFORM is None, reason="terraform is not on PATH")


# --------------------------------------------------------------------------------------------
# Helpers: running terraform, reading HCL text
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tf_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("tfhome")
    cli_config = home / "terraformrc"
    cli_config.write_text("# empty: no plugin cache, no credentials, no mirrors\n")
    env = dict(os.environ)
    for key in [k for k in env if k.startswith("TF_VAR_") or k in ("TF_CLI_ARGS", "TF_WORKSPACE")]:
        del env[key]
    env.update(
        TF_IN_AUTOMATION="1",
        CHECKPOINT_DISABLE="1",
        TF_CLI_CONFIG_FILE=str(cli_config),
        TF_INPUT="0",
    )
    env.pop("TF_PLUGIN_CACHE_DIR", None)
    return env


@pytest.fixture(scope="module")
def tf_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of terraform/ (relative module sources keep working) without any local state, with
    ha/health.json at the same place relative to it as in the repository."""
    dest = tmp_path_factory.mktemp("tfcopy") / "terraform"
    shutil.copytree(
        TF_DIR,
        dest,
        ignore=shutil.ignore_patterns(".terraform", "*.tfstate*", ".terraform.lock.hcl", ".generated"),
    )
    (dest.parent / "ha").mkdir()
    shutil.copy2(HEALTH_JSON, dest.parent / "ha" / "health.json")
    return dest


def terraform(
    args: list[str], cwd: Path, env: dict[str, str], data_dir: Path | None = None
) -> subprocess.CompletedProcess:
    run_env = dict(env)
    if data_dir is not None:
        run_env["TF_DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [TERRAFORM, *args, "-no-color"] if args[0] != "fmt" else [TERRAFORM, *args],
        cwd=cwd,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=TF_TIMEOUT,
    )


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"rc={proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def strip_comments(text: str) -> str:
    """HCL text with #, // and /* */ comments blanked (strings and ${} interpolations respected)."""
    out: list[str] = []
    i, n = 0, len(text)
    stack: list[str] = ["code"]  # "code" | "str" | "interp" (code inside ${ } within a string)
    depth: list[int] = []  # brace depth per open interpolation
    while i < n:
        c = text[i]
        mode = stack[-1]
        if mode == "str":
            if c == "\\":
                out.append(text[i : i + 2])
                i += 2
                continue
            if text.startswith("${", i):
                stack.append("interp")
                depth.append(0)
                out.append("${")
                i += 2
                continue
            if c == '"':
                stack.pop()
            out.append(c)
            i += 1
            continue
        # code or interpolation
        if c == "#" or text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        if text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
            continue
        if c == '"':
            stack.append("str")
        elif mode == "interp" and c == "{":
            depth[-1] += 1
        elif mode == "interp" and c == "}":
            if depth[-1] == 0:
                stack.pop()
                depth.pop()
            else:
                depth[-1] -= 1
        out.append(c)
        i += 1
    return "".join(out)


def blocks(text: str, kind: str) -> dict[str, str]:
    """Top-level ``kind "label" { ... }`` (or ``kind "a" "b"``) blocks -> body text,
    keyed by the labels joined with '.'."""
    text = strip_comments(text)
    found: dict[str, str] = {}
    for m in re.finditer(rf'(?m)^{kind}((?:\s+"[^"]+")+)\s*\{{', text):
        labels = ".".join(re.findall(r'"([^"]+)"', m.group(1)))
        start = m.end()
        level, i, in_str, interp = 1, start, False, 0
        while level and i < len(text):
            c = text[i]
            if in_str:
                if c == "\\":
                    i += 1
                elif text.startswith("${", i):
                    interp += 1
                    i += 1
                elif c == "}" and interp:
                    interp -= 1
                elif c == '"' and not interp:
                    in_str = False
            elif c == '"':
                in_str = True
            elif c == "{":
                level += 1
            elif c == "}":
                level -= 1
            i += 1
        found[labels] = text[start : i - 1]
    return found


def tf_text(directory: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(directory.glob("*.tf")))


def attribute_names(body: str) -> set[str]:
    """Argument names assigned at the top level of a block body (e.g. a module call's inputs)."""
    names, level = set(), 0
    for line in body.splitlines():
        if level == 0:
            m = re.match(r"\s*([A-Za-z_][A-Za-z0-9_-]*)\s*=", line)
            if m:
                names.add(m.group(1))
        level += line.count("{") + line.count("[") - line.count("}") - line.count("]")
    return names


# --------------------------------------------------------------------------------------------
# Formatting and the .gitignore
# --------------------------------------------------------------------------------------------


def test_fmt_check_recursive(tf_env: dict[str, str]) -> None:
    proc = terraform(["fmt", "-check", "-recursive", "-diff", "terraform/"], REPO, tf_env)
    assert proc.returncode == 0, "terraform fmt would change files:\n" + explain(proc)


def test_gitignore_keeps_terraform_state_out() -> None:
    ignored = (TF_DIR / ".gitignore").read_text().split()
    for pattern in (".terraform/", "*.tfstate", "*.tfstate.*", ".terraform.lock.hcl"):
        assert pattern in ignored


def test_no_terraform_working_files_are_tracked() -> None:
    """State, .terraform/ and (until hcloud is first initialised) lock files stay out of git."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(
        ["git", "ls-files", "--", "terraform"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.split()
    assert [f for f in tracked if ".terraform" in f or ".tfstate" in f] == []


# --------------------------------------------------------------------------------------------
# modules/layout: terraform test
# --------------------------------------------------------------------------------------------


def test_layout_module_declares_no_provider() -> None:
    text = strip_comments(tf_text(LAYOUT))
    assert "required_providers" not in text
    assert not re.search(r'(?m)^(provider|resource|data)\s+"', text)


def test_layout_terraform_test_passes(tf_copy: Path, tf_env: dict[str, str], tmp_path: Path) -> None:
    module = tf_copy / "modules" / "layout"
    init = terraform(["init", "-backend=false", "-input=false"], module, tf_env, tmp_path / "data")
    assert init.returncode == 0, explain(init)

    proc = terraform(["test"], module, tf_env, tmp_path / "data")
    assert proc.returncode == 0, explain(proc)
    test_files = (module / "tests").glob("*.tftest.hcl")
    runs = sum(len(re.findall(r'(?m)^run\s+"', p.read_text())) for p in test_files)
    m = re.search(r"(\d+) passed, (\d+) failed", proc.stdout)
    assert m, explain(proc)
    assert (int(m.group(1)), int(m.group(2))) == (runs, 0), explain(proc)
    assert runs >= 40  # the validation runs alone are about 40; a lost file would show here
    print(f"terraform test (modules/layout): {runs} passed, 0 failed")


def test_every_layout_validation_has_expect_failures_runs() -> None:
    variables = blocks((LAYOUT / "variables.tf").read_text(), "variable")
    rules = {name: body.count("validation {") for name, body in variables.items() if "validation {" in body}
    tests = "\n".join(p.read_text() for p in (LAYOUT / "tests").glob("*.tftest.hcl"))
    expected = re.findall(r"expect_failures\s*=\s*\[\s*var\.([a-z_]+)\s*\]", tests)
    missing = {
        name: (count, expected.count(name)) for name, count in rules.items() if expected.count(name) < count
    }
    assert missing == {}, "variable: (validation rules, expect_failures runs)"
    assert "expect_failures = [check.location_quorum]" in tests


def test_layout_variables_and_outputs_are_typed_and_described() -> None:
    for name, body in blocks((LAYOUT / "variables.tf").read_text(), "variable").items():
        assert re.search(r"(?m)^\s*type\s*=", body), name
        assert re.search(r"(?m)^\s*description\s*=", body), name
    for name, body in blocks((LAYOUT / "outputs.tf").read_text(), "output").items():
        assert re.search(r"(?m)^\s*description\s*=", body), name


def expected_health_check(health: dict) -> dict:
    """The cloud load balancer check that ha/health.json defines: mirror_ready's port, path and
    expect_status with the timings of its cloud_lb object."""
    ready = health["checks"]["mirror_ready"]
    return {
        "protocol": "http",
        "port": ready["port"],
        "path": ready["path"],
        "interval": ready["cloud_lb"]["interval_s"],
        "timeout": ready["cloud_lb"]["timeout_s"],
        "retries": ready["cloud_lb"]["retries"],
        "status_codes": [str(ready["expect_status"])],
    }


def changed_health(health: dict) -> dict:
    """health.json with every value the cloud load balancer uses changed."""
    doc = json.loads(json.dumps(health))
    ready = doc["checks"]["mirror_ready"]
    ready.update(port=ready["port"] + 1000, path=ready["path"] + "-changed", expect_status=204)
    lb = ready["cloud_lb"]
    lb.update(interval_s=lb["interval_s"] + 7, timeout_s=lb["timeout_s"] + 1, retries=lb["retries"] + 2)
    return doc


@pytest.mark.parametrize("variant", ["repository", "changed"])
def test_layout_health_check_is_ha_health_json(variant: str, tf_env: dict[str, str], tmp_path: Path) -> None:
    """A root that calls modules/layout with no health-check inputs gets ha/health.json's check;
    with health.json changed in place (same relative path), the check changes with it."""
    health = json.loads(HEALTH_JSON.read_text())
    if variant == "changed":
        health = changed_health(health)
        assert expected_health_check(health) != expected_health_check(json.loads(HEALTH_JSON.read_text()))
    shutil.copytree(LAYOUT, tmp_path / "terraform" / "modules" / "layout",
                    ignore=shutil.ignore_patterns(".terraform", "*.tfstate*", ".terraform.lock.hcl"))  # fmt: skip
    (tmp_path / "ha").mkdir()
    (tmp_path / "ha" / "health.json").write_text(json.dumps(health, indent=2))
    root = tmp_path / "root"
    root.mkdir()
    (root / "main.tf").write_text(
        'module "layout" {\n'
        '  source      = "../terraform/modules/layout"\n'
        '  admin_cidrs = ["203.0.113.7/32"]\n'
        "}\n\n"
        'output "health_check" {\n  value = module.layout.health_check\n}\n\n'
        'output "mirror_port" {\n  value = module.layout.mirror_port\n}\n'
    )
    data = tmp_path / "data"
    init = terraform(["init", "-input=false"], root, tf_env, data)
    assert init.returncode == 0, explain(init)
    apply = terraform(["apply", "-auto-approve", "-input=false"], root, tf_env, data)
    assert apply.returncode == 0, explain(apply)
    out = terraform(["output", "-json"], root, tf_env, data)
    assert out.returncode == 0, explain(out)
    outputs = json.loads(out.stdout)
    assert outputs["health_check"]["value"] == expected_health_check(health)
    assert outputs["mirror_port"]["value"] == health["checks"]["mirror_ready"]["port"]


# --------------------------------------------------------------------------------------------
# local: init, validate, and the command wiring
# --------------------------------------------------------------------------------------------


def test_local_init_and_validate_offline(tf_copy: Path, tf_env: dict[str, str], tmp_path: Path) -> None:
    root = tf_copy / "local"
    init = terraform(["init", "-input=false"], root, tf_env, tmp_path / "data")
    assert init.returncode == 0, explain(init)
    proc = terraform(["validate"], root, tf_env, tmp_path / "data")
    assert proc.returncode == 0, explain(proc)
    assert "The configuration is valid" in proc.stdout
    assert not (root / ".terraform.lock.hcl").exists()  # no providers, so no lock file


def test_local_declares_no_provider() -> None:
    text = strip_comments(tf_text(LOCAL))
    assert "required_providers" not in text
    assert set(re.findall(r'(?m)^resource\s+"([^"]+)"', text)) == {"terraform_data"}


def test_local_defaults_name_the_ansible_entry_points() -> None:
    variables = blocks((LOCAL / "variables.tf").read_text(), "variable")
    assert "ansible/scripts/hosts-up" in variables["up_command"]
    assert "ansible-playbook -i" in variables["playbook_command"]
    assert "ansible/site.yml" in variables["playbook_command"]
    assert "ansible/scripts/hosts-down" in variables["down_command"]
    assert "when        = destroy" in (LOCAL / "main.tf").read_text()


def test_local_apply_runs_up_playbook_then_down_on_destroy(
    tf_copy: Path, tf_env: dict[str, str], tmp_path: Path
) -> None:
    """The Ansible side does not exist yet, so the three commands are replaced by recorders:
    this proves the order, the working directory and the environment they get, nothing more."""
    root = tf_copy / "local"
    data = tmp_path / "data"
    log = tmp_path / "calls.log"
    inventory = tmp_path / "out" / "inventory.yml"
    seen = tmp_path / "seen-by-up.yml"
    hosts_json = tmp_path / "hosts.json"
    variables = [
        "-var", f"inventory_path={inventory}",
        "-var", f'up_command=echo "up $(pwd)" >> {log}; cp "$PLC_INVENTORY" {seen}; '
                f'printf "%s" "$PLC_HOSTS" > {hosts_json}',
        "-var", f'playbook_command=echo "playbook $PLC_INVENTORY" >> {log}',
        "-var", f'down_command=echo "down $PLC_INVENTORY" >> {log}',
    ]  # fmt: skip
    init = terraform(["init", "-input=false"], root, tf_env, data)
    assert init.returncode == 0, explain(init)
    try:
        apply = terraform(["apply", "-auto-approve", "-input=false", *variables], root, tf_env, data)
        assert apply.returncode == 0, explain(apply)
        assert log.read_text().splitlines() == [f"up {tf_copy.parent}", f"playbook {inventory}"]

        out = terraform(["output", "-json"], root, tf_env, data)
        assert out.returncode == 0, explain(out)
        outputs = json.loads(out.stdout)
        assert inventory.read_text() == outputs["ansible_inventory"]["value"]
        assert seen.read_text() == outputs["ansible_inventory"]["value"]  # written before up ran
        hosts = json.loads(hosts_json.read_text())
        assert sorted(hosts) == ["plc-balancer-1", "plc-node-1", "plc-node-2", "plc-node-3"]
        assert hosts["plc-node-2"]["private_ip"] == "10.77.0.12"
        text = inventory.read_text()
        assert '    plc-node-1:\n      ansible_host: "10.77.0.11"\n      private_ip: "10.77.0.11"' in text
        for group in ("etcd", "postgres", "plc", "balancers"):
            assert f"\n    {group}:\n      hosts:\n" in text

        again = terraform(["plan", "-detailed-exitcode", "-input=false", *variables], root, tf_env, data)
        assert again.returncode == 0, "a second plan must have nothing to do\n" + explain(again)
    finally:
        destroy = terraform(["destroy", "-auto-approve", "-input=false", *variables], root, tf_env, data)
    assert destroy.returncode == 0, explain(destroy)
    assert log.read_text().splitlines()[-1] == f"down {inventory}"


# --------------------------------------------------------------------------------------------
# hcloud: static checks only (the provider cannot be installed here)
# --------------------------------------------------------------------------------------------

HCLOUD_RESOURCES = {
    "hcloud_network",
    "hcloud_network_subnet",
    "hcloud_placement_group",
    "hcloud_ssh_key",
    "hcloud_server",
    "hcloud_firewall",
    "hcloud_load_balancer",
    "hcloud_load_balancer_network",
    "hcloud_load_balancer_target",
    "hcloud_load_balancer_service",
    "hcloud_floating_ip",
    "hcloud_floating_ip_assignment",
}


def test_hcloud_provider_is_pinned() -> None:
    versions = strip_comments((HCLOUD / "versions.tf").read_text())
    assert re.search(r'source\s*=\s*"hetznercloud/hcloud"', versions)
    assert re.search(r'version\s*=\s*"~>\s*\d+\.\d+"', versions)
    assert re.search(r'required_version\s*=\s*">=\s*1\.9', versions)
    example = strip_comments((HCLOUD / "examples" / "basic" / "main.tf").read_text())
    assert re.search(r'version\s*=\s*"~>\s*\d+\.\d+"', example)


def test_hcloud_has_the_required_resources() -> None:
    resources = blocks(tf_text(HCLOUD), "resource")
    assert {key.split(".")[0] for key in resources} == HCLOUD_RESOURCES
    assert 'type   = "spread"' in resources["hcloud_placement_group.nodes"]
    server = resources["hcloud_server.node"]
    assert "for_each = module.layout.nodes" in server
    for needle in (
        "placement_group_id = hcloud_placement_group.nodes.id",
        "firewall_ids",
        "ip         = each.value.private_ip",
    ):
        assert needle in server
    assert 'module.layout.cloud_firewall_rules["node"]' in resources["hcloud_firewall.nodes"]
    assert "for_each = hcloud_server.node" in resources["hcloud_load_balancer_target.node"]
    assert "use_private_ip   = true" in resources["hcloud_load_balancer_target.node"]
    service = resources["hcloud_load_balancer_service.http"]
    for field in ("protocol", "port", "interval", "timeout", "retries", "path", "status_codes"):
        assert f"module.layout.health_check.{field}" in service, field
    assert "count = var.floating_ip ? 1 : 0" in resources["hcloud_floating_ip.this"]


def test_hcloud_variables_are_typed_and_described() -> None:
    variables = blocks((HCLOUD / "variables.tf").read_text(), "variable")
    assert variables
    for name, body in variables.items():
        assert re.search(r"(?m)^\s*type\s*=", body), name
        assert re.search(r"(?m)^\s*description\s*=", body), name
    assert re.search(r"(?m)^\s*type\s*=\s*bool", variables["floating_ip"])
    assert "sensitive   = true" in variables["hcloud_token"]


def test_hcloud_references_only_declared_variables_and_layout_inputs() -> None:
    text = strip_comments(tf_text(HCLOUD))
    declared = set(blocks((HCLOUD / "variables.tf").read_text(), "variable"))
    assert set(re.findall(r"\bvar\.([a-z_]+)", text)) <= declared
    layout_inputs = set(blocks((LAYOUT / "variables.tf").read_text(), "variable"))
    layout_outputs = set(blocks((LAYOUT / "outputs.tf").read_text(), "output"))
    call = blocks(text, "module")["layout"]
    assert '"../modules/layout"' in call
    assert attribute_names(call) - {"source"} <= layout_inputs
    assert set(re.findall(r"\bmodule\.layout\.([a-z_]+)", text)) <= layout_outputs


def test_hcloud_outputs_present_and_described() -> None:
    outputs = blocks((HCLOUD / "outputs.tf").read_text(), "output")
    wanted = {"ansible_inventory", "nodes", "load_balancer_ipv4", "load_balancer_ipv6", "floating_ip"}
    wanted.add("health_check")
    assert wanted <= set(outputs)
    for name, body in outputs.items():
        assert re.search(r"(?m)^\s*description\s*=", body), name
    assert "module.layout.ansible_inventory" in outputs["ansible_inventory"]


def test_hcloud_example_sets_every_required_input() -> None:
    variables = blocks((HCLOUD / "variables.tf").read_text(), "variable")
    required = {name for name, body in variables.items() if not re.search(r"(?m)^\s*default\s*=", body)}
    call = blocks((HCLOUD / "examples" / "basic" / "main.tf").read_text(), "module")["plc"]
    assert 'source = "../.."' in call
    inputs = attribute_names(call) - {"source"}
    assert required <= inputs
    assert inputs <= set(variables)


# --------------------------------------------------------------------------------------------
# README: every input and output is listed
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("directory", [LAYOUT, HCLOUD, LOCAL], ids=["layout", "hcloud", "local"])
def test_readme_lists_every_input_and_output(directory: Path) -> None:
    readme = (TF_DIR / "README.md").read_text()
    section = readme.split(f"<!-- {directory.relative_to(TF_DIR)} -->", 1)[1].split("<!-- end -->", 1)[0]
    text = tf_text(directory)
    for kind in ("variable", "output"):
        for name in blocks(text, kind):
            assert f"| `{name}` |" in section, f"{kind} {name}: no row in the {directory.name} README table"
