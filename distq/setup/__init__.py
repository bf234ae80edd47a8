"""What every layer reads: the config (frozen dataclasses, YAML files, overrides, the generated reference), devices
and the machine (threads, memory, its description, Ray workers' environment). No torch models, no files of a
run."""
