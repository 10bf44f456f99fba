"""nydusd's HTTP admin API (spec interfaces.md §3): ``api.app.create_app(daemon)`` builds the FastAPI
app, ``api.server.start_api_server(daemon, path)`` serves it on a unix socket, ``api.client.ApiClient``
talks to it. The only package importing fastapi/uvicorn/prometheus_client; it never imports
fs/storage/rafs internals."""
