"""The HTTP door: the producers' API, webhooks, the suppression list's routes and the docs."""
