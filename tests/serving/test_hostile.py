"""schemathesis against the server's own OpenAPI document: generated requests never get a 5xx."""

import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from flywheel.lifecycle import train_challenger
from tests.conftest import SOURCE_TYPES, ServerProcess, example_config, load_project, write_table

# One worker builds this module's shared fixture (a trained model, a server) once.
pytestmark = pytest.mark.xdist_group("serving-test_openapi_fuzz")


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, sba_sample):
    folder = tmp_path_factory.mktemp("fuzz")
    cfg = example_config()
    cfg["model"]["params"] = {"num_boost_round": 40}
    cfg["serving"]["max_records"] = 20  # keep generated lists small
    (folder / "flywheel.yaml").write_text(yaml.safe_dump(cfg))
    project = load_project(folder / "flywheel.yaml", env={"FLYWHEEL_HOME": str(folder / ".flywheel")})
    write_table(sba_sample, project.source_url, "loans", SOURCE_TYPES)
    assert train_challenger(project).promoted
    srv = ServerProcess(project, env={"FLYWHEEL_ADMIN_TOKEN": "fuzz-token"})
    yield srv
    srv.stop()


OPERATIONS = ["POST /v1/predict", "POST /v2/models/{name}/infer", "GET /v2/models/{name}",
              "GET /v1/models", "POST /v1/feedback", "GET /health", "GET /ready", "GET /metrics",
              "POST /admin/reload"]


# Schema-violating cases exist only where there is a body or a parameter to violate.
CASES = [(label, GenerationMode.POSITIVE) for label in OPERATIONS] + [
    (label, GenerationMode.NEGATIVE) for label in OPERATIONS[:3] + ["POST /v1/feedback"]]


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{m.value}-{lbl}" for lbl, m in CASES])
def test_no_generated_request_gets_a_server_error(fuzz_server, label, mode):
    """250 generated cases per operation and mode (schema-valid and schema-violating requests)."""
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    operation = schema.find_operation_by_label(label)
    assert operation is not None, f"{label} is missing from the OpenAPI document"
    seen = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck),
              database=None)
    def check(case):
        response = case.call(base_url=fuzz_server.url)
        seen.append(response.status_code)
        case.validate_response(response, checks=[not_a_server_error])

    check()
    assert seen and max(seen) < 500
