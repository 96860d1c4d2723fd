terraform {
  required_version = ">= 1.9.0"

  # No required_providers: terraform_data and local-exec are built into Terraform, so this
  # root initialises and validates with no registry access.
}
