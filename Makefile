# The two commands (see README): `make run` starts the main job, `make test` installs everything and runs all tests.
.PHONY: setup run test bench clean

setup:
	bash scripts/setup.sh

run: setup
	.venv/bin/ragkv serve

test: setup
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/python bench/store_throughput.py

clean:
	rm -rf build dist *.egg-info .pytest_cache bench/results/quick
