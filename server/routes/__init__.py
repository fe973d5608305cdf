"""HTTP routers, one module per surface; server/app.py includes them into the app it builds."""
