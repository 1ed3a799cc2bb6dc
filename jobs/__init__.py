"""Ray job entrypoints: thin layers that parse config, call dmoerm stages and make the Ray calls."""
