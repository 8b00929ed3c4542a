"""
Movers: migrate's own L{migrate.IMigratable} for protocols the application
did not write (twisted.web's HTTP/1.1 channel, twisted.web.websocket's
connections), found through an adapter-style registry keyed on the
protocol's class.
"""
