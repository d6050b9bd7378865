# modules/instances: the SSH key pair, the AMI, and the control hosts and web servers.

# The newest official Debian 12 image of the hosts' architecture (the Debian cloud team's
# account, which names them debian-12-amd64-* and debian-12-arm64-*); its login user is `admin`.
data "aws_ami" "debian" {
  count = var.ami_id == null ? 1 : 0

  most_recent = true
  owners      = [local.debian_owner]

  filter {
    name   = "name"
    values = ["debian-12-${var.architecture == "arm64" ? "arm64" : "amd64"}-*"]
  }

  filter {
    name   = "architecture"
    values = [var.architecture]
  }

  filter {
    name   = "virtualization-type"
    values = ["hvm"]
  }
}

locals {
  debian_owner = "136693071363"
  ami_id       = var.ami_id != null ? var.ami_id : data.aws_ami.debian[0].id

  hosts = merge(
    { for i in range(var.control_count) : "control-${i + 1}" => {
      role          = "control"
      index         = i
      instance_type = var.control_instance_type
      volume_size   = var.control_root_volume_size
      sg            = var.control_security_group_id
      profile       = var.control_instance_profile_name
    } },
    { for i in range(var.web_count) : "web-${i + 1}" => {
      role          = "web"
      index         = i
      instance_type = var.web_instance_type
      volume_size   = var.web_root_volume_size
      sg            = var.web_security_group_id
      profile       = null
    } },
  )
}

resource "aws_key_pair" "admin" {
  key_name_prefix = "${var.name_prefix}-admin-"
  public_key      = trimspace(var.ssh_public_key)
  tags            = { Name = "${var.name_prefix}-admin" }
}

resource "aws_instance" "host" {
  for_each = local.hosts

  ami                  = local.ami_id
  instance_type        = each.value.instance_type
  key_name             = aws_key_pair.admin.key_name
  iam_instance_profile = each.value.profile
  # Round robin over the subnets, so hosts of each role spread over the AZs.
  subnet_id                   = var.subnet_ids[each.value.index % length(var.subnet_ids)]
  vpc_security_group_ids      = [each.value.sg]
  associate_public_ip_address = true

  root_block_device {
    volume_type = "gp3"
    volume_size = each.value.volume_size
    encrypted   = true
    tags        = { Name = "${var.name_prefix}-${each.key}" }
  }

  # IMDSv2 only: a request forgery through an app cannot read the control role's credentials
  # with a plain GET; one hop, so only processes on the host itself reach it.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  tags = {
    Name           = "${var.name_prefix}-${each.key}"
    PlatformxRole  = each.value.role
    PlatformxIndex = tostring(each.value.index + 1)
  }

  lifecycle {
    # A new Debian point release changes the AMI lookup every few weeks; that must not replace
    # running hosts on the next apply. Replace one on purpose with
    # `terraform apply -replace='module.instances.aws_instance.host["web-1"]'`.
    ignore_changes = [ami]
  }
}
