"""The label app: people compare, rank, rate and rewrite model outputs; trainers read the exports.

    items.py      settings and candidate rows, validated      store.py   the database (SQLite / PostgreSQL)
    assign.py     queue, submissions, undo                     stats.py   dashboard numbers
    agreement.py  kappa, alpha (pure)                          export.py  preference / rating / SFT / raw files
    app.py        the web server (pages + JSON API)

The server imports no training code: candidates are sampled by `rlhfkit label init --model` before it
starts, and trainers talk to it through its JSON API or read its exports.
"""
