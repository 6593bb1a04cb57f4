"""Server-rendered pages: a Jinja layout and form macros, the shared stylesheet and script, CSRF
tokens for forms and the session cookie a browser signs in with."""
