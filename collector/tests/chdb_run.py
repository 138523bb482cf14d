"""Runs statements and named queries on chdb (the current ClickHouse engine, in
process) for collector/tests/current_clickhouse.rs.

stdin: {"statements": [sql, ...], "queries": [[name, sql], ...]}
stdout: {"version": "...", "statements": [null | error, ...],
         "results": {name: {"tsv": text} | {"error": text}}}
"""
import json
import sys
import tempfile

from chdb import session


def main() -> None:
    job = json.load(sys.stdin)
    with tempfile.TemporaryDirectory() as path:
        s = session.Session(path)
        out = {"version": str(s.query("SELECT version()", "TSV")).strip()}
        statements = []
        for sql in job["statements"]:
            try:
                s.query(sql)
                statements.append(None)
            except Exception as e:  # chdb raises its own error type per statement
                statements.append(str(e))
        out["statements"] = statements
        results = {}
        for name, sql in job["queries"]:
            try:
                results[name] = {"tsv": s.query(sql, "TabSeparated").bytes().decode()}
            except Exception as e:
                results[name] = {"error": str(e)}
        out["results"] = results
        s.close()
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
