"""The errors a stage reports as a clear message rather than a traceback.

Kept in one import-light module so that every stage command can name them
without importing (and so depending on) the modules that raise them.
"""

from __future__ import annotations


class DataError(RuntimeError):
    """The raw data could not be obtained or parsed."""


class DataContractError(ValueError):
    """Prepared splits break the data contract; lists every violation."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("data contract violated:\n  " + "\n  ".join(problems))


class PromotionRefused(RuntimeError):
    """The candidate may not be deployed (failed gates, or bad artifacts)."""


class IntegrityError(RuntimeError):
    """A stored version's files do not match the hashes in its manifest."""


class RegistryError(RuntimeError):
    """The registry's own state is unusable (for example a bad alias)."""


class ParamsChanged(RuntimeError):
    """params.yaml changed while a run or stage was using it."""


class ModelError(ValueError):
    """A teacher checkpoint (or a compression step on it) shrinkflow cannot
    use: an unsupported architecture, pickle-only weights."""


HANDLED = (DataError, DataContractError, PromotionRefused, IntegrityError, RegistryError, ParamsChanged,
           FileNotFoundError, ModelError)


class DeploymentMissing(RuntimeError):
    """The deploy stage ran, yet the registry does not serve what it deployed."""
