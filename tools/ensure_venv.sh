# Source me: creates or reuses ./.venv from requirements.txt and installs this project (hpa/) into it in
# editable mode, re-installing only when requirements.txt or pyproject.toml changed since the last
# install. Sets $PY to the venv's python. HPA_VENV overrides the venv location.
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_venv="${HPA_VENV:-$_root/.venv}"
_base_py="$(command -v python3.11 || command -v python3)"
if [ ! -x "$_venv/bin/python" ]; then
    echo "[env] creating virtual environment in $_venv with $_base_py" >&2
    "$_base_py" -m venv "$_venv"
fi
_want="$(cat "$_root/requirements.txt" "$_root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
_have="$(cat "$_venv/.requirements.sha256" 2>/dev/null || true)"
if [ "$_want" != "$_have" ]; then
    echo "[env] installing requirements.txt and the hpa package into $_venv (first run: a few minutes)" >&2
    "$_venv/bin/python" -m pip install -q --disable-pip-version-check -r "$_root/requirements.txt" 2> >(grep -v "^WARNING: Location" >&2)
    "$_venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e "$_root" 2> >(grep -v "^WARNING: Location" >&2)
    echo "$_want" > "$_venv/.requirements.sha256"
fi
PY="$_venv/bin/python"
# A venv shared between checkouts (HPA_VENV) has its editable install pointing at one of them: put this
# checkout first so that its own hpa/ is the one imported.
[ -n "${HPA_VENV:-}" ] && export PYTHONPATH="$_root${PYTHONPATH:+:$PYTHONPATH}"
unset _root _venv _base_py _want _have
