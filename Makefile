# The two README commands: `make demo` and `make test`. Both create the virtual environment and
# install what they need themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# The browser test (tests/test_app.py) drives Debian's chromium with the playwright-core npm package
# (a browser build of its own cannot be downloaded here). CI runs as root on a fresh machine.
PLAYWRIGHT_CORE := build/browser/node_modules/playwright-core/package.json
PLAYWRIGHT_CORE_VERSION := 1.65.1

# A second environment with the oldest stack the bundle's remote code supports (transformers 4.51, the Inference
# Endpoints container's): tests/test_transformers_compat.py answers with a published tiny bundle in it.
COMPAT_VENV ?= .venv-tf451
COMPAT_STAMP := $(COMPAT_VENV)/.installed-stamp

.PHONY: install demo test lint format clean browser-deps compat-venv dicom-deps

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements-dev.txt
	# The project itself (editable, deps already there): installs the `visual-med-alpaca` command.
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

$(COMPAT_STAMP): requirements-transformers4.txt
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install --quiet -r requirements-transformers4.txt
	touch $(COMPAT_STAMP)

compat-venv: $(COMPAT_STAMP)

demo: $(STAMP)
	$(BIN)/python demo.py

/usr/bin/chromium:
	apt-get install -y --no-install-recommends chromium || (apt-get update && apt-get install -y --no-install-recommends chromium)

$(PLAYWRIGHT_CORE):
	command -v npm >/dev/null || apt-get install -y --no-install-recommends nodejs npm
	mkdir -p build/browser
	npm install --prefix build/browser --no-audit --no-fund --no-save playwright-core@$(PLAYWRIGHT_CORE_VERSION)

browser-deps: /usr/bin/chromium $(PLAYWRIGHT_CORE)

# tests/test_dicom_dcmtk.py compares the DICOM rendering with DCMTK's (dcm2pnm, dcmj2pnm, dcml2pnm); DCMTK has
# no free JPEG 2000 codec, so GDCM's gdcmconv decompresses those files for it first.
DICOM_TOOLS := dcmtk libgdcm-tools
/usr/bin/dcm2pnm /usr/bin/gdcmconv:
	apt-get install -y --no-install-recommends $(DICOM_TOOLS) || (apt-get update && apt-get install -y --no-install-recommends $(DICOM_TOOLS))

dicom-deps: /usr/bin/dcm2pnm /usr/bin/gdcmconv

test: $(STAMP) $(COMPAT_STAMP) browser-deps dicom-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf build .pytest_cache
