# Thin wrappers over `python -m helpers ...` (which also works without make).
# The first call creates .venv with the pinned dependencies (about a minute, once).
PYTHON ?= python3

.PHONY: run test lab check refresh bench db-start db-stop db-status clean

run:        ## execute the whole series into build/ (HTML + summary)
	$(PYTHON) -m helpers run

test:       ## ruff, the helpers' tests, every notebook under nbval
	$(PYTHON) -m helpers test

lab:        ## JupyterLab on notebooks/ with the database ready
	$(PYTHON) -m helpers lab

check:      ## is this machine ready? (packages, database)
	$(PYTHON) -m helpers check

bench:      ## benchmarks against the ceilings: build/bench.json, a table and a plot
	$(PYTHON) -m helpers bench

refresh:    ## re-execute notebooks and store their outputs in place (review the diff!)
	$(PYTHON) -m helpers refresh

db-start db-stop db-status:
	$(PYTHON) -m helpers db $(subst db-,,$@)

clean:      ## remove build/ (keeps .venv and the embedded server's data)
	rm -rf build
