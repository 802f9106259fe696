"""The scheduler: where model instances run, and why (or why not) in words.

- `capacity`: free memory per device (probe measurement and bookings, whichever leaves
  less), indexed in sorted lists and kept in step with the replicated state.
- `requirement`: what a replica needs per device, from the model's estimate and its
  deployment's placement spec; what each engine can split.
- `placement`: the decision (`Scheduler.place_in`), plans tried simplest first; `plan`:
  what it returns (`Placement`, `Unschedulable`); `multinode`: the plans over several nodes.
- `explain`: the words.
"""

from ..sizes import format_bytes
from .capacity import Booking, ClusterIndex, bookings_of
from .placement import Scheduler
from .plan import Placement, Unschedulable
from .requirement import DEVICES, ENGINES, POLICIES, EngineTraits, Requirement

__all__ = ["Booking", "ClusterIndex", "DEVICES", "ENGINES", "EngineTraits", "POLICIES",
           "Placement", "Requirement", "Scheduler", "Unschedulable", "bookings_of",
           "format_bytes"]
