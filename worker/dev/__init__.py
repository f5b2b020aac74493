"""Development tooling: the provider simulator, the process stack and the demo. The runtime
never imports this package (an import-linter contract checks it)."""
