"""A model card shows only its own plots: names from the run's facts.json are allowlisted,
confined to the card's folder and must be PNG files."""

import os

from flywheel.lifecycle.card import PNG_SIGNATURE, card_images, render_html

PNG = PNG_SIGNATURE + b"\x00\x00\x00\rIHDR"


def test_only_allowlisted_png_plots_inside_the_folder_are_read(tmp_path):
    card = tmp_path / "card"
    card.mkdir()
    (card / "roc_pr.png").write_bytes(PNG)
    (card / "calibration.png").write_bytes(b"<svg onload=alert(1)>")  # not a PNG
    (tmp_path / "secret.txt").write_text("FLYWHEEL_ADMIN_TOKEN=hunter2")
    (card / "importance.png").symlink_to(tmp_path / "secret.txt")  # a link out of the folder
    names = ["roc_pr.png", "calibration.png", "importance.png", "/proc/self/environ",
             "../secret.txt", str(tmp_path / "secret.txt"), 7, None]
    assert card_images(card, names) == {"roc_pr.png": PNG}
    assert card_images(card, "/proc/self/environ") == {}


def test_a_facts_file_naming_the_environment_inlines_nothing(tmp_path):
    os.environ.setdefault("FLYWHEEL_TEST_SECRET", "do-not-show")
    images = card_images(tmp_path, ["/proc/self/environ"])
    html = render_html("![x](/proc/self/environ)", images, "card")
    assert "do-not-show" not in html and "base64" not in html


def test_the_card_made_after_training_is_rendered_from_memory_and_equals_the_runs(loaded_project,
                                                                                  monkeypatch):
    """Work done once: the facts just logged are not downloaded back to render the card."""
    from flywheel.lifecycle.card import render_card
    from flywheel.lifecycle.train import train_challenger
    from flywheel.registry import Registry

    project = loaded_project({"model": {"params": {"num_boost_round": 20}}})
    downloads = []
    original = Registry.download_run_artifacts

    def counted(self, *args, **kwargs):
        downloads.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Registry, "download_run_artifacts", counted)
    result = train_challenger(project)
    assert not [d for d in downloads if "card" in map(str, d)]
    registry = Registry.for_project(project)
    logged = registry.download_run_artifacts(result.version, "card", project.home / "card-check")
    from_run = render_card(project, registry, result.version)
    assert from_run is not None and (logged / "model_card.md").read_text() == from_run.markdown


def test_the_monitoring_table_shows_each_windows_estimate_its_band_and_the_audit():
    from flywheel.lifecycle.card import _monitoring_lines

    base = {"window_start": None, "window_end": None, "rows": 4000, "drift_share": 0.2,
            "drift_detected": False, "metric": "roc_auc", "metric_value": 0.61, "performance_drop": False}
    text = "\n".join(_monitoring_lines([
        {**base, "id": 1, "estimated_metric": "roc_auc", "estimated_value": 0.72, "estimated_low": 0.69,
         "estimated_high": 0.75, "estimate_note": None, "concept_shift": True},
        {**base, "id": 2, "metric_value": None, "estimated_metric": "roc_auc", "estimated_value": None,
         "estimated_low": None, "estimated_high": None, "concept_shift": None,
         "estimate_note": "41 predictions in the window; a band needs at least 100"}]))
    assert "| performance | estimated |" in text
    assert "| roc_auc 0.61 | roc_auc 0.72 [0.69, 0.75] (concept shift) |" in text
    assert "| — (41 predictions in the window; a band needs at least 100) |" in text
