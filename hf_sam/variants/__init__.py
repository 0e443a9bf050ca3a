"""The SAM family. Each module registers its variants; users add theirs with `@register("name")`."""

from .registry import Variant, available, get, register, unregister

get_variant = get

from . import sam  # noqa: E402,F401  (registers sam, asam)

__all__ = ["Variant", "available", "get", "get_variant", "register", "unregister"]
