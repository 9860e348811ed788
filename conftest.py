"""Project-wide test set-up: hypothesis profiles.

``dev`` (default) keeps example counts small for a quick local loop; ``ci`` (selected when
``CI`` is set, or with HYPOTHESIS_PROFILE=ci) runs more examples with derandomised seeds.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=25, deadline=None)
settings.register_profile(
    "ci", max_examples=60, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
