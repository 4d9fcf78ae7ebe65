"""Building blocks of a backend made of other backends (its members): one configuration dataclass that
holds every member's fields (the second member's under a prefix, so that both can have a `base_width`),
and the training run as one member sees it (its networks checkpointed under the same prefix).
"""

import dataclasses
from typing import Dict, Sequence, Tuple, get_type_hints

from ..config import FieldError

Member = Tuple[str, type]  # (prefix of its fields, its configuration dataclass)


def composite_config(name: str, members: Sequence[Member], doc: str, own=(), own_validate=None) -> type:
    """A dataclass with its `own` fields ((name, type, field) triples) and the fields of every member's
    dataclass, each renamed `prefix + name` (its command line flag likewise), whose `validate()`
    validates every member and then calls `own_validate(self)`."""
    specs = []
    for prefix, cls in members:
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            metadata = dict(f.metadata)
            if prefix and "flag" in metadata:
                metadata["flag"] = "--" + prefix.replace("_", "-") + metadata["flag"][2:]
            specs.append((prefix + f.name, hints[f.name], dataclasses.field(default=f.default, metadata=metadata)))
    specs += list(own)

    def validate(self) -> None:
        for prefix, cls in members:
            try:
                member_config(self, prefix, cls).validate()
            except FieldError as exc:
                raise FieldError(prefix + exc.key, exc.problem) from None
        if own_validate is not None:
            own_validate(self)

    composite = dataclasses.make_dataclass(name, specs, namespace={"validate": validate, "__doc__": doc})
    composite.members = tuple(members)
    return composite


def member_config(config, prefix: str, cls):
    """The member's own dataclass, with the values of its fields in the composite `config`."""
    return cls(**{f.name: getattr(config, prefix + f.name) for f in dataclasses.fields(cls)})


def join_configs(composite: type, *configs):
    """The composite dataclass holding the member dataclasses `configs` (in the members' order)."""
    values = {}
    for (prefix, cls), config in zip(composite.members, configs):
        values.update({prefix + f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})
    return composite(**values)


class MemberRun:
    """The training run as one member of a composite backend sees it: its networks and optimisers are
    restored and checkpointed as `prefix + name`, beside the other members'; all else is the run's."""

    def __init__(self, run, prefix: str):
        self._run = run
        self._prefix = prefix

    def __getattr__(self, name):
        return getattr(self._run, name)

    def _named(self, modules: Dict[str, object]) -> Dict[str, object]:
        return {self._prefix + name: module for name, module in modules.items()}

    def restore(self, networks, optimizers) -> None:
        self._run.restore(self._named(networks), self._named(optimizers))

    def run_stage(self, stage, total_steps, step_fn, networks, optimizers) -> None:
        self._run.run_stage(stage, total_steps, step_fn, self._named(networks), self._named(optimizers))
