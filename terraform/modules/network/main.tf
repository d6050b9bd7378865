# modules/network: a VPC with an internet gateway and two public subnets in two AZs, or an
# existing VPC and subnets passed through. Either way the callers get the VPC's CIDR block,
# which is what "inside the VPC" means in the security groups.

locals {
  create = var.vpc_id == null
}

data "aws_availability_zones" "available" {
  count = local.create ? 1 : 0
  state = "available"

  # Local Zones and Wavelength Zones lack instance types and load balancer support; keep to real AZs.
  filter {
    name   = "opt-in-status"
    values = ["opt-in-not-required"]
  }
}

resource "aws_vpc" "this" {
  count = local.create ? 1 : 0

  cidr_block = var.vpc_cidr
  # Instances get resolvable private DNS names (ip-10-42-0-10.<region>.compute.internal).
  enable_dns_support   = true
  enable_dns_hostnames = true

  tags = { Name = var.name_prefix }

  lifecycle {
    precondition {
      condition     = length(var.subnet_ids) == 0
      error_message = "subnet_ids is set but vpc_id is not: set both to use an existing VPC, or neither to create one."
    }
  }
}

resource "aws_internet_gateway" "this" {
  count  = local.create ? 1 : 0
  vpc_id = aws_vpc.this[0].id
  tags   = { Name = var.name_prefix }
}

resource "aws_subnet" "public" {
  count = local.create ? 2 : 0

  vpc_id            = aws_vpc.this[0].id
  availability_zone = data.aws_availability_zones.available[0].names[count.index]
  # /16 -> two /20s; /24 -> two /28s (the smallest subnet AWS allows).
  cidr_block = cidrsubnet(var.vpc_cidr, 4, count.index)
  # Every host is reached by Ansible over its public address.
  map_public_ip_on_launch = true

  tags = { Name = "${var.name_prefix}-public-${data.aws_availability_zones.available[0].names[count.index]}" }

  lifecycle {
    precondition {
      condition     = length(data.aws_availability_zones.available[0].names) >= 2
      error_message = "the region has fewer than two available AZs."
    }
  }
}

resource "aws_route_table" "public" {
  count  = local.create ? 1 : 0
  vpc_id = aws_vpc.this[0].id
  tags   = { Name = "${var.name_prefix}-public" }
}

resource "aws_route" "internet" {
  count                  = local.create ? 1 : 0
  route_table_id         = aws_route_table.public[0].id
  destination_cidr_block = "0.0.0.0/0"
  gateway_id             = aws_internet_gateway.this[0].id
}

resource "aws_route_table_association" "public" {
  count          = local.create ? 2 : 0
  subnet_id      = aws_subnet.public[count.index].id
  route_table_id = aws_route_table.public[0].id
}

# An existing VPC: its CIDR block, and a check that the subnets given belong to it.
data "aws_vpc" "given" {
  count = local.create ? 0 : 1
  id    = var.vpc_id

  lifecycle {
    postcondition {
      condition     = length(var.subnet_ids) >= 1
      error_message = "vpc_id is set but subnet_ids is empty: name at least one public subnet of that VPC."
    }
  }
}

data "aws_subnet" "given" {
  count = local.create ? 0 : length(var.subnet_ids)
  id    = var.subnet_ids[count.index]

  lifecycle {
    postcondition {
      condition     = self.vpc_id == var.vpc_id
      error_message = "subnet ${self.id} is in ${self.vpc_id}, not in vpc_id ${var.vpc_id}."
    }
  }
}
