variable "name_prefix" {
  description = "Prefix of resource names."
  type        = string
}

variable "ssh_public_key" {
  description = "OpenSSH public key for the admin user."
  type        = string
}

variable "ami_id" {
  description = "AMI for every host (null: the newest Debian 12 amd64)."
  type        = string
  default     = null
}

variable "architecture" {
  description = "x86_64 or arm64: the Debian 12 AMI looked up when ami_id is not set."
  type        = string
}

variable "subnet_ids" {
  description = "Subnets to spread the hosts over."
  type        = list(string)
}

variable "control_count" {
  description = "Number of control hosts."
  type        = number
}

variable "web_count" {
  description = "Number of web servers."
  type        = number
}

variable "control_instance_type" {
  description = "Instance type of the control hosts."
  type        = string
}

variable "web_instance_type" {
  description = "Instance type of the web servers."
  type        = string
}

variable "control_root_volume_size" {
  description = "Root volume size of the control hosts, GiB."
  type        = number
}

variable "web_root_volume_size" {
  description = "Root volume size of the web servers, GiB."
  type        = number
}

variable "control_security_group_id" {
  description = "Security group of the control hosts."
  type        = string
}

variable "web_security_group_id" {
  description = "Security group of the web servers."
  type        = string
}

variable "control_instance_profile_name" {
  description = "Instance profile of the control hosts (access to the bundles bucket)."
  type        = string
}
