"""``python -m cmiexp.objectives.kd OVERRIDES``: train (or find) the teacher of a KD config."""

from cmiexp.objectives.kd.teacher import main

raise SystemExit(main())
