# test/moto.tf: copied beside the real configuration by terraform/check (never used by itself).
# The address of the moto server the check started on a free local port.

variable "moto_endpoint" {
  description = "URL of the local AWS API emulator, e.g. http://127.0.0.1:45123."
  type        = string

  validation {
    condition     = can(regex("^http://127\\.0\\.0\\.1:[0-9]+$", var.moto_endpoint))
    error_message = "moto_endpoint must be a loopback URL: the test never talks to real AWS."
  }
}
