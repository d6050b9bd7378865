output "vpc_id" {
  description = "The VPC the cluster is in."
  value       = local.create ? aws_vpc.this[0].id : var.vpc_id
}

output "vpc_cidr" {
  description = "The VPC's primary CIDR block: the only source allowed on the control ports."
  value       = local.create ? aws_vpc.this[0].cidr_block : data.aws_vpc.given[0].cidr_block
}

output "subnet_ids" {
  description = "Public subnets, in two AZs when created here."
  value       = local.create ? aws_subnet.public[*].id : var.subnet_ids
  # So that no instance starts in a subnet without its route to the internet yet (cloud-init
  # and apt need it on first boot).
  depends_on = [aws_route.internet, aws_route_table_association.public]
}

output "subnet_azs" {
  description = "The availability zone of each subnet in subnet_ids, in the same order."
  value       = local.create ? aws_subnet.public[*].availability_zone : data.aws_subnet.given[*].availability_zone
}
