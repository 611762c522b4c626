"""``python -m cmiexp.objectives.kd OVERRIDES``: train (or find) the teacher of a KD config."""

from cmiexp.objectives.kd.teacher import main
from cmiexp.resolvers import register_resolvers

register_resolvers()

raise SystemExit(main())
