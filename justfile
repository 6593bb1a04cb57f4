# Every routine task; `./dev <recipe>` installs what is needed first.

bin := justfile_directory() / ".venv/bin"

# list the recipes
default:
    @{{bin}}/just --list --unsorted

# bring the whole platform up on the embedded default (Ctrl-C stops it; data is kept)
up *ARGS:
    exec {{bin}}/iotistic up {{ARGS}}

# run the test suite against real Postgres and NATS JetStream (embedded unless TEST_*_URL set)
test *ARGS:
    {{bin}}/pytest {{ARGS}}

# lint, format check, type check, and the architecture's import rules (pyproject.toml)
check:
    {{bin}}/ruff check .
    {{bin}}/ruff format --check .
    {{bin}}/mypy
    {{bin}}/lint-imports

# refresh docs/events.md and contracts/asyncapi.json from the services' declarations
catalogue:
    {{bin}}/python -m services.catalogue --write

# format the code
fmt:
    {{bin}}/ruff format .
    {{bin}}/ruff check --fix .

# measure speed and memory: `just bench events` (see docs/figures.md for the figures)
bench *WHAT:
    {{bin}}/python -m tests.bench {{WHAT}}

# inject faults (kill -9, SIGSTOP, full disk) and check nothing is lost: `just chaos --short`
chaos *ARGS:
    {{bin}}/python -m tests.chaos {{ARGS}}

# fuzz every operation of the control plane and an instance: `just fuzz --examples 200 --seconds 600`
fuzz *ARGS:
    {{bin}}/python -m tests.security.fuzz {{ARGS}}

# checkov's findings on the chart (every tests/deploy/chart-values file) and one customer per plan
checkov *FOLDER:
    {{bin}}/python -m tests.deploy.kube_checks {{FOLDER}}

# rebuild (or --verify, --dry-run) a service's read models from the log
replay SERVICE *ARGS:
    {{bin}}/iotistic replay {{SERVICE}} {{ARGS}}

# write the JSON Schemas of every event to contracts/schemas
schemas:
    {{bin}}/iotistic contracts export --out contracts/schemas

# write the bus users' permissions the chart renders into NATS's config (default stream names)
bus-permissions:
    env -u EVENTS_STREAM -u EVENTS_SUBJECT_PREFIX {{bin}}/iotistic bus permissions --json > charts/iotistic/files/bus-permissions.json.new
    mv charts/iotistic/files/bus-permissions.json.new charts/iotistic/files/bus-permissions.json

# pin the installed dependency versions into constraints.txt
lock:
    {{bin}}/pip freeze --exclude-editable --exclude iotistic > constraints.txt
