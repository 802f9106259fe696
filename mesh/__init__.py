"""The gpumesh daemon: config, state, scheduler, node agent, gateway, API, CLI."""
