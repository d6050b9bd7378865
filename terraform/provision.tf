# provision.tf: the apply's last step, with provision = true: scripts/provision configures the
# hosts with ansible/site.yml, over SSH from the machine running Terraform, with the inventory
# rendered here and each host's SSH keys from its EC2 console output (see ansible/provision.py).
#
# Why Terraform runs Ansible rather than the hosts configuring themselves from user data: the
# cluster's secrets (CA, tokens, em's config) are made once on the operator's machine by the
# pki role and reach each host over SSH, so no secret sits in user data or needs a parameter
# store, and the same playbook configures machines that Terraform did not make. The cost is
# SSH from the operator's machine to the hosts (port 22 from admin_cidrs).
#
# terraform_data is Terraform's own resource (no provider to download). It is replaced, and so
# the provisioning runs again, when the inventory (hosts, addresses, domain, ACME settings),
# the release (a tarball's content, or the version and URL of a published one) or the web
# servers' batch size change; an apply that changes none of them runs
# nothing. The inventory is written with mode 0600 under the root module's directory, beside the
# cluster's secrets and the known_hosts the script writes: keep that directory (see
# docs/src/operating/from-zero.md, "Back up").

locals {
  # In the root module's directory (path.cwd would be where `terraform -chdir=...` was typed).
  provision_dir       = "${abspath(path.root)}/.platformx/${var.name_prefix}"
  provision_inventory = "${local.provision_dir}/hosts.yml"
  release_bin_dir     = abspath("${path.module}/../target/release")
  release_binaries    = [for name in ["apprepo", "beacon", "maestro"] : "${local.release_bin_dir}/${name}"]
  # What the hosts run: a published version (by its version and URL: a version's tarball
  # never changes, and scripts/provision checks it against its .sha256), the tarball (by its
  # content, so a rebuilt file with the same name counts as new), or the local build's
  # binaries (missing ones are reported by the script). pathexpand: a `~/...` path works as in
  # a shell.
  release_tarball = var.release_tarball != "" ? abspath(pathexpand(var.release_tarball)) : ""
  release_fingerprint = var.release_version != "" ? "version ${var.release_version} ${var.release_url}" : (
    local.release_tarball != "" ? "${local.release_tarball} ${filesha256(local.release_tarball)}" : join(" ", [
      for file in local.release_binaries : fileexists(file) ? filesha256(file) : "missing"
    ])
  )
  # The published tarball of the hosts' architecture (scripts/dist's target triples).
  release_target = var.architecture == "arm64" ? "aarch64-unknown-linux-gnu" : "x86_64-unknown-linux-gnu"
  release_args = var.release_version != "" ? ["--release-version", var.release_version, "--release-url", var.release_url, "--release-target", local.release_target] : (
    local.release_tarball != "" ? ["--release-tarball", local.release_tarball] : ["--bin-dir", local.release_bin_dir]
  )
  provision_command = length(var.provision_command) > 0 ? var.provision_command : [abspath("${path.module}/../scripts/provision")]
  provision_args = concat(
    ["--inventory", local.provision_inventory, "--web-serial", var.provision_web_serial],
    local.release_args,
    var.ssh_private_key_file != "" ? ["--private-key", abspath(pathexpand(var.ssh_private_key_file))] : [],
  )
  # One shell word per argument: single quotes, each quote inside written as '\''.
  provision_shell_words = join(" ", [for word in concat(local.provision_command, local.provision_args) : "'${replace(word, "'", "'\\''")}'"])
}

resource "terraform_data" "provision" {
  count = var.provision ? 1 : 0

  triggers_replace = {
    inventory  = sha256(local.ansible_inventory)
    release    = local.release_fingerprint
    target     = local.release_target
    web_serial = var.provision_web_serial
  }

  lifecycle {
    # Checked here rather than in the variables: Terraform 1.5 validates each variable alone.
    precondition {
      condition     = var.release_version == "" || var.release_tarball == ""
      error_message = "release_version and release_tarball are both set: install a published version or a local tarball, not both (unset one of them)."
    }
    precondition {
      condition     = var.release_version == "" || var.release_url != ""
      error_message = "release_version is set but release_url is not: name where the release tarballs of scripts/dist are published."
    }
  }

  provisioner "local-exec" {
    interpreter = ["/bin/sh", "-c"]
    command     = <<-EOT
      set -eu
      umask 077
      mkdir -p "$PX_PROVISION_DIR"
      printf '%s' "$PX_INVENTORY" > "$PX_PROVISION_DIR/hosts.yml"
      chmod 0600 "$PX_PROVISION_DIR/hosts.yml"
      exec ${local.provision_shell_words}
    EOT
    environment = {
      PX_PROVISION_DIR = local.provision_dir
      PX_INVENTORY     = local.ansible_inventory
    }
  }
}
