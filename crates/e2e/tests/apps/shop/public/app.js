// Says it ran, then opens a WebSocket to the page's own host and shows the echo of one message.
// window.shopSocket tells the test where the socket is: connecting, open, echoed, error, closed.
document.getElementById("script").textContent = "the script ran";
window.shopSocket = { state: "connecting" };
const socket = new WebSocket("wss://" + location.host + "/ws");
socket.onopen = () => {
  window.shopSocket = { state: "open" };
  socket.send("ping from the page");
};
socket.onmessage = (event) => {
  window.shopSocket = { state: "echoed", echo: event.data };
  document.getElementById("socket").textContent = event.data;
  socket.close();
};
socket.onerror = () => {
  if (window.shopSocket.state !== "echoed") window.shopSocket = { state: "error" };
};
socket.onclose = (event) => {
  if (window.shopSocket.state !== "echoed") window.shopSocket = { state: "closed", code: event.code };
};
