#!/usr/bin/env bash
# Print the newest usable CPython >= 3.11 (jax 0.12 on 3.12+ is faster on CPU than 0.10 on 3.11).
for v in 3.13 3.12 3.11; do
  for cand in "python$v" $(ls -d /root/.pyenv/versions/$v*/bin/python3 2>/dev/null) /usr/bin/python$v /usr/local/bin/python$v; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import venv, ensurepip' >/dev/null 2>&1; then
      echo "$cand"; exit 0
    fi
  done
done
echo python3
