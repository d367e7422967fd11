"""Shared entry-point plumbing: Hydra composition, validation, clean error exits."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from concept.config import CONF_DIR, Config, ConfigError, validate
from concept.store import StoreError
from concept.vocab import InputError

USER_ERRORS = (ConfigError, InputError, StoreError, FileNotFoundError)


def entry_point(
    run: Callable[[Config], int | None],
    config_name: str = "config",
    validator: Callable = validate,
) -> Callable[[], None]:
    """Wrap ``run(cfg) -> exit code`` as a Hydra command line.

    The returned function composes ``conf/<config_name>.yaml`` with the command line's
    dotted overrides (``--config-dir`` adds a user's own config folder), validates it with
    ``validator``, runs, and turns user errors into one line on stderr with exit code 2
    instead of a traceback.
    """
    import hydra

    @hydra.main(version_base=None, config_path=str(CONF_DIR), config_name=config_name)
    def _main(raw) -> None:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        try:
            code = run(validator(raw))
        except USER_ERRORS as e:
            print(f"error: {e}", file=sys.stderr)
            code = 2
        if code:
            sys.exit(code)

    return _main
