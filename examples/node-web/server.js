// A tiny Node.js service for trying devloop: GET / answers with a greeting.
const http = require("http");
const port = Number(process.env.PORT || 3000);
http
  .createServer((req, res) => {
    res.writeHead(200, { "Content-Type": "text/plain" });
    res.end("Hello from node-web\n");
  })
  .listen(port, () => console.log(`listening on ${port}`));
