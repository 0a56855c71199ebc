"""The one error type a user can cause; entry points print its message and exit non-zero."""


class UserError(ValueError):
  """Bad input from the user (name, config value, dataset, checkpoint): the message says what to do."""
