# Drawn by qtune-bench; re-run with `gnuplot quant_speed.gp` in this folder (scripts/plot_bench.sh does every plot).
set terminal pngcairo size 1000,600 enhanced font 'DejaVu Sans,10'
set output 'quant_speed.png'
set encoding utf8
set grid lc rgb '#dddddd'
set key noenhanced
set termoption noenhanced
$s << EOD
"nf4" 1.07885 1.30194 1.62086
"nf4 dq=false" 1.01318 1.3698 1.63828
"hqq nbits=4" 0.511151 1.53397 2.70531
"hqq nbits=4 gs=128" 0.572245 1.56859 2.27195
"hqq nbits=3" 0.41971 1.68841 3.02578
"hqq nbits=2 gs=16" 0.34278 1.99434 3.68697
"hqq nbits=2" 0.431702 1.64788 2.7427
"hqq nbits=8" 0.355764 1.61181 3.14692
"int8" 0.819567 1.12761 1.18676
"int8 gs=128" 0.922381 1.1691 1.619
EOD
set title 'Speed on gaussian 11008x4096 (ratios measured in the same run)'
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set xtics rotate by -30 left font ',9'
set ylabel 'ratio (log)'
set logscale y
set key outside top center horizontal
set xrange [-0.6:9.6]
set bmargin 6
plot $s using 2:xtic(1) title 'dequantize to fp32: GB/s / memcpy GB/s', \
     '' using 3 title 'linear fwd+bwd fp32: time / dense fp32', \
     '' using 4 title 'linear fwd+bwd bf16: time / dense bf16', \
     1 with lines dt 2 lc rgb 'black' notitle
