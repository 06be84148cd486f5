"""Fix the replay's drift trigger from data BEFORE FY2002 only, and print what to commit.

Takes the project's champion (the FY1995-2001 model `flywheel demo --no-replay` trains), scores
the drift of each quarter of FY2000-2001 (after its training rows, before the replay) against its
training reference, exactly as monitoring will, and proposes `monitoring.drift_share`: the
smallest multiple of 0.05 above every pre-replay quarter's share of drifted features, so that a
drift verdict means "more drift than the model already saw before the replay". No replay data is
read: the source query stops at 2001-10-01.

    .venv/bin/python scripts/calibrate_triggers.py --config examples/sba-loans/flywheel.yaml
"""

from __future__ import annotations

import argparse
import math
from datetime import date

from flywheel.config import load_project
from flywheel.data import features as feats
from flywheel.data.sources import extract_window
from flywheel.demo.replay import quarters
from flywheel.monitoring.drift import detect_drift
from flywheel.monitoring.monitor import reference_of
from flywheel.monitoring.reference import feature_frame
from flywheel.registry import CHAMPION, Registry

REPLAY_START = date(2001, 10, 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="examples/sba-loans/flywheel.yaml")
    args = parser.parse_args()
    project = load_project(args.config)
    registry = Registry.for_project(project)
    version = registry.alias_version(CHAMPION)
    assert version is not None, "train the FY1995-2001 champion first: flywheel demo --no-replay"
    profile, _ = reference_of(registry, version, project.home / "cache")
    spec = feats.FeatureSpec.from_json(registry.load_artifacts(version).feature_spec)
    cfg = project.config.monitoring
    qs = quarters(date(1999, 10, 1), 8)
    assert qs[-1].end <= REPLAY_START
    # as_of far ahead keeps rows whose label is not known yet: drift needs inputs, not labels.
    frame = extract_window(project.source_url, project.config.data, spec.input_columns,
                           project.snapshot_dir, window=(qs[0].start, qs[-1].end),
                           as_of=date(2200, 1, 1)).frame()
    shares = []
    for q in qs:
        part = frame[(frame[project.config.data.time_column] >= str(q.start))
                     & (frame[project.config.data.time_column] < str(q.end))]
        current = feature_frame(spec, feats.build_matrix(spec, part))
        result = detect_drift(profile, current, cfg.drift_threshold, cfg.drift_share, columns=spec.names)
        shares.append(result.share)
        print(f"{q.label}: {len(part):6,} loans, drift share {result.share:.2f} "
              f"({', '.join(result.drifted_columns) or 'none'})")
    proposal = math.floor(max(shares) / 0.05 + 1) * 0.05
    print(f"\nmax pre-replay share {max(shares):.3f} -> monitoring.drift_share: {min(proposal, 1.0):.2f} "
          f"(per-column threshold {cfg.drift_threshold}, Evidently's default)")


if __name__ == "__main__":
    main()
