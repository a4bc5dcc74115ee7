# make run   create .venv, install, start Relay on built-in defaults
# make test  install what the tests need, then lint, type-check and run every test
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Only for the tests (`relay` itself refuses RELAY_* variables that are not settings).
test: export RELAY_TEST_POSTGRES_URL ?= postgresql+asyncpg://postgres@127.0.0.1:5432/test

.PHONY: run test lint browser deploy-tools bench-cluster bench bench-production bench-smoke bench-heavy bench-dkim bench-search bench-search-postgres chaos clean

$(VENV)/.run: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.test: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(VENV)/.run $@

run: $(VENV)/.run
	$(BIN)/relay serve

lint: $(VENV)/.test
	$(BIN)/ruff check relay tests bench
	$(BIN)/ruff format --check relay tests bench
	$(BIN)/mypy relay

# The console's browser tests drive Debian's chromium through chromium-driver.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }

# tests/test_deploy.py checks deploy/docker-compose.yml with Debian's docker-compose (no daemon needed).
deploy-tools:
	@command -v docker-compose >/dev/null || \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-compose; }

test: lint browser deploy-tools
	$(BIN)/pytest -n auto

$(VENV)/.bench: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	touch $(VENV)/.run $(VENV)/.test $@

# The full benchmark: installs Postfix (Debian package) as the reference peer, ~20 minutes; bench/results/latest.md
bench: $(VENV)/.bench
	$(BIN)/python bench/bench.py

# only the production scenarios (DKIM, VERP, tracking, a webhook endpoint; SQLite, then a fresh PostgreSQL database
# relay_bench_prod at 127.0.0.1:5432), Postfix alongside, ~2 minutes; bench/work/production/latest.md
bench-production: $(VENV)/.bench
	$(BIN)/python bench/bench.py --scenario production --no-lookup --out bench/work/production

# 200 messages, then 100 production ones, through Relay only (CI runs it in tests/test_bench_smoke.py)
bench-smoke: $(VENV)/.test
	$(BIN)/python bench/bench.py --smoke --out bench/work/smoke

# small-message latency while 20 MB HTML messages with 100k links flow (tracking on); bench/results/heavy.md
bench-heavy: $(VENV)/.test
	$(BIN)/python bench/heavy.py

# CPU per 1,000 DKIM-signed 2 KB messages (RSA 2048, Ed25519); bench/results/dkim.md
bench-dkim: $(VENV)/.test
	$(BIN)/python bench/dkim_sign.py --out bench/results/dkim.md

# search at 1,000,000 messages (seeds bench/work/search-1000000.db once, ~3 minutes); bench/results/search.md
bench-search: $(VENV)/.test
	$(BIN)/python bench/search.py --out bench/results/search.md

# the same on PostgreSQL (database relay_bench_search at 127.0.0.1:5432, made when missing); bench/results/search-postgres.md
BENCH_PG ?= postgresql+asyncpg://postgres@127.0.0.1:5432/relay_bench_search
bench-search-postgres: $(VENV)/.test
	psql -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'relay_bench_search'" | grep -q 1 || \
		createdb -h 127.0.0.1 -U postgres relay_bench_search
	$(BIN)/python bench/search.py --postgres $(BENCH_PG) --out bench/results/search-postgres.md

# 1, 2 and 3 `relay serve` nodes on one PostgreSQL (database relay_bench_cluster at 127.0.0.1:5432, made afresh
# for every run) against one node on SQLite; bench/results/cluster.md. The load is Postfix's smtp-source and
# smtp-sink, unpacked from Debian's postfix package into bench/work (Postfix itself is not installed).
PF_TOOLS := $(CURDIR)/bench/work/postfix-tools/root
bench-cluster: $(VENV)/.test
	@test -x $(PF_TOOLS)/usr/sbin/smtp-source || { mkdir -p bench/work/postfix-tools && cd bench/work/postfix-tools && \
		{ apt-get download postfix || { apt-get update -q && apt-get download postfix; }; } && dpkg -x postfix_*.deb root; }
	PATH="$(PF_TOOLS)/usr/sbin:$$PATH" LD_LIBRARY_PATH="$(PF_TOOLS)/usr/lib/postfix" $(BIN)/python bench/cluster.py

# kill -9 at 50 random moments under load; prints the report and keeps it in bench/results/chaos.md
chaos: $(VENV)/.test
	CHAOS_KILLS=50 CHAOS_REPORT=bench/results/chaos.md $(BIN)/pytest -s -p no:cacheprovider --timeout 1800 tests/delivery/test_chaos.py

clean:
	rm -rf $(VENV) relay-data .pytest_cache .mypy_cache .ruff_cache
