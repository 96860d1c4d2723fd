terraform {
  # 1.9 is the first version whose `validation` blocks may refer to other variables and
  # locals (the cross-variable rules in variables.tf need that).
  required_version = ">= 1.9.0"

  # Deliberately no required_providers: this module holds only locals, variables, outputs
  # and a check block, so it can be initialised and tested with no registry access.
}
