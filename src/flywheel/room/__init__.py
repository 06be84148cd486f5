"""The control room: one page that shows a project's whole loop (models and their alias history,
live traffic, drift, performance, pipeline runs) with promote and rollback buttons.

`data` reads the stores (SQL aggregations on indexed columns), `charts` draws SVG on the server
(no script library, no network), `page` renders the HTML and `app` serves both, with the JSON
of every section, behind a viewer token when it listens beyond 127.0.0.1.
"""
